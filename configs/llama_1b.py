"""llama_1b: Llama-3.2-1B shapes (16 layers, d_model 2048, 32 heads / 8 KV heads, SwiGLU 8192, tied).

    lmjax plan --config configs/llama_1b.py --devices 1 --device-memory-gb 80

An accelerator config: not trained here. Expect `plan` to print ~1.24B parameters and ~16 bytes/parameter of
weights + gradients + Adam moments in float32 (about 20 GB), which fits one 80 GB GPU before activations.
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "llama"
    c.model.num_layers = 16
    c.model.num_heads = 32
    c.model.num_kv_heads = 8
    c.model.d_model = 2048
    c.model.d_ff = 8192
    c.model.seq_len = 2048
    c.model.vocab_size = 128256
    c.model.rope_theta = 500000.0
    c.model.tie_embeddings = True
    c.train.steps = 20000
    c.train.batch_size = 256
    c.train.grad_accum = 8
    c.train.lr = 3e-4
    c.train.warmup_steps = 1000
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.tokenizer.vocab_size = 128256
    return c
