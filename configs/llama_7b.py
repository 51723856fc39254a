"""llama_7b: Llama-2-7B shapes (32 layers, d_model 4096, 32 heads, SwiGLU 11008, untied), FSDP on a pod.

    lmjax plan --config configs/llama_7b.py --devices 256 --config.mesh.data=1 --config.mesh.fsdp=-1

An accelerator config: not trained here. Expect `plan` to print ~6.74B parameters; unsharded, weights + gradients
+ Adam moments need ~108 GB per device, on a 256-way FSDP mesh ~0.42 GB per device.
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "llama"
    c.model.num_layers = 32
    c.model.num_heads = 32
    c.model.d_model = 4096
    c.model.d_ff = 11008
    c.model.seq_len = 4096
    c.model.vocab_size = 32000
    c.model.norm_eps = 1e-5
    c.train.steps = 100000
    c.train.batch_size = 1024
    c.train.lr = 3e-4
    c.train.warmup_steps = 2000
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.tokenizer.vocab_size = 32000
    return c
