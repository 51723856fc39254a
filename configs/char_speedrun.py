"""char_speedrun: the char_baby model and data (nanoGPT's CPU "baby GPT" shape: 4 layers, 4 heads, d_model 128,
context 64, batch 12) trained the speedrun way: Muon, a short warm-up and a long cooldown, ReLU², QK-norm,
zero-initialised output projections and an untied head, for 400 steps instead of 2000.

    .venv/bin/python tools/bench/char_baby_gpt.py --lmjax-config configs/char_speedrun.py   # data, peer, this
    lmjax train --config configs/char_speedrun.py --workdir runs/char_speedrun               # after the line above

Expect (2-core AMD EPYC, ~55 s with an empty compile cache): validation loss about 1.40 nats per character, below
the PyTorch peer's 1.41 after its 2000 nanoGPT steps, in half its wall time (docs/benchmarks.md, "Char-level baby
GPT"; each change's row is in the ablation there).
"""

from pathlib import Path

from lmjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("char_baby.py"))  # its model, data, batch, betas, decay, clipping
    c.model.dtype = "auto"  # bfloat16 where its matmuls measure >= 1.3x float32's, else float32
    c.model.mlp = "relu2"  # relu(x)² in place of GELU
    c.model.qk_norm = True  # 1.417 -> 1.359 at 600 steps: the largest single gain here
    c.model.zero_init_out = True  # every block starts as the identity
    c.model.tie_embeddings = False  # an untied head: 1.417 -> 1.408 at 600 steps
    c.train.optimizer = "muon"
    c.train.muon_momentum = 0.9  # 1.417 -> 1.396 at 600 steps against the default 0.95
    c.train.steps = 400
    c.train.lr = 3e-3
    c.train.warmup_steps = 20
    c.train.decay = "wsd"
    c.train.cooldown_fraction = 0.4  # the last 160 steps decay linearly to lr * min_lr_ratio
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.ckpt_every = 400
    return c
