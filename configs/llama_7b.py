"""llama_7b: (untested accelerator config) Llama-2-7B shapes (32 layers, d_model 4096, 32 heads, SwiGLU
11008, untied), FSDP on a pod.

    lmjax plan --config configs/llama_7b.py --devices 256 --config.mesh.data=1 --config.mesh.fsdp=-1

An accelerator config: not trained here. Expect `plan` to print ~6.74B parameters; unsharded, weights + gradients
+ Adam moments need ~108 GB per device, on a 256-way FSDP mesh ~0.42 GB per device (+0.1 GB gradient accumulator)
and, with remat=full and one sequence per device per micro-batch, ~11.3 GB of activations: fits 16 GB chips.
Launch recipes: experiments/launch/tpu_pod.sh and experiments/launch/slurm.sbatch.
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
    c.model.remat = "full"  # without it one sequence's activations alone exceed a chip's memory (lmjax plan)
    c.train.batch_size = 1024
    c.train.grad_accum = 4  # micro-batches of 256: one 4096-token sequence per device on 256 devices
    c.train.lr = 3e-4
    c.train.warmup_steps = 2000
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.tokenizer.vocab_size = 32000
    return c
