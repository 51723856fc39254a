"""gpt2_small: GPT-2 124M shapes (12 layers, 12 heads, d_model 768, context 1024, tied embeddings).

    lmjax plan --config configs/gpt2_small.py
    lmjax train --config configs/gpt2_small.py --workdir runs/gpt2_small   # on an accelerator

With the GPT-2 vocabulary (50257) this is 124M parameters; with the default 4096-token tokenizer trained
on the stdlib corpus it is ~89M. Expect val bits/byte well under the tiny model's after a few thousand
steps on one GPU; on this CPU one step takes minutes, so it is a planning config here.
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "gpt2"
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.d_model = 768
    c.model.d_ff = 3072
    c.model.seq_len = 1024
    c.model.tie_embeddings = True
    c.model.vocab_size = 50257
    c.model.dropout = 0.0
    c.train.steps = 5000
    c.train.batch_size = 64
    c.train.grad_accum = 1
    c.train.lr = 6e-4
    c.train.warmup_steps = 500
    c.train.eval_every = 500
    c.train.ckpt_every = 1000
    c.tokenizer.vocab_size = 50257
    return c
