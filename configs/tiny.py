"""tiny: a 4-layer Llama-style model trained on the embedded stdlib corpus on a laptop CPU.

    lmjax train --config configs/tiny.py --workdir runs/tiny
    lmjax sample --workdir runs/tiny --prompt "Return the"

Expect (2-core CPU, ~4 min at ~6,000 tokens/s in bfloat16 on an AMD EPYC, ~5 min in float32): val bits/byte
about 1.60 against 2.7 for a unigram model (1.70 with AdamW, cosine decay, SwiGLU and bfloat16 before:
docs/benchmarks.md, "Time to quality"), and samples that read like docstrings ("Return the mock object ... This is
a generic class which ...").
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "llama"
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_model = 256
    c.model.d_ff = 768
    c.model.seq_len = 256
    c.model.dtype = "auto"  # bfloat16 where its matmuls measure >= 1.3x float32's (AMD EPYC: ~1.2x tokens/s)
    c.model.mlp = "relu2"  # these four reach a given val bpb in 0.52x the time (docs/benchmarks.md, "Time to quality")
    c.model.zero_init_out = True
    c.train.optimizer = "muon"
    c.train.decay = "wsd"
    c.train.muon_momentum = 0.9  # with lr 3e-3: val bpb 1.599 at 300 steps against 1.634 with 0.95 and 2e-3
    c.train.steps = 300  # the quickstart's budget; 400 steps reach 1.564 (docs/benchmarks.md, "Chat (quickstart)")
    c.train.batch_size = 16
    c.train.lr = 3e-3
    c.train.warmup_steps = 50
    c.train.eval_every = 100
    c.train.ckpt_every = 150  # one checkpoint half-way, as before, and the final one
    c.tokenizer.vocab_size = 4096
    return c
