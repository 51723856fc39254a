"""llama_1b: (untested accelerator config) Llama-3.2-1B shapes: 16 layers, d_model 2048, 32/8 KV heads,
SwiGLU 8192, tied.

    lmjax plan --config configs/llama_1b.py --devices 1 --device-memory-gb 80

An accelerator config: not trained here. Expect `plan` to print ~1.24B parameters, ~16 bytes/parameter of
weights + gradients + Adam moments in float32 (about 20 GB, +5 GB gradient accumulator) and, with remat=full
and micro-batches of 8 sequences, ~37 GB of activations: ~61 GB, fits one 80 GB GPU. Launch recipe for a
node of 8 GPUs (pretrain, chat-tune, demo, DPO): experiments/launch/gpu_node.sh.
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
    c.train.grad_accum = 32  # micro-batches of 8 sequences: fits one 80 GB GPU with remat=full (lmjax plan)
    c.model.remat = "full"
    c.train.lr = 3e-4
    c.train.warmup_steps = 1000
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.tokenizer.vocab_size = 128256
    return c
