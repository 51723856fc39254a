"""char_baby: nanoGPT's CPU "baby GPT" (4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps,
lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4, AdamW betas (0.9, 0.99), weight decay 0.1, clipping
1.0, no dropout, tied embeddings) on characters of Python's own documentation topics (`pydoc_data.topics`).

    .venv/bin/python tools/bench/char_baby_gpt.py        # writes the data, trains this and a PyTorch peer
    lmjax train --config configs/char_baby.py --workdir runs/char_baby/lmjax   # after the line above

Expect (2-core CPU, ~5 minutes under load): validation loss about 1.40 nats per character, level with the
PyTorch peer's 1.41 (figures and command in docs/benchmarks.md, "Char-level baby GPT").
"""

from lmjax.config import base_config

DATA_DIR = "runs/char_baby/data"  # where tools/bench/char_baby_gpt.py writes train.txt and val.txt


def get_config():
    c = base_config()
    c.model.family = "gpt2"
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_model = 128
    c.model.d_ff = 512
    c.model.seq_len = 64
    c.model.dropout = 0.0
    c.model.tie_embeddings = True
    c.tokenizer.kind = "char"
    c.data.train = f"text:{DATA_DIR}/train.txt"
    c.data.val = f"text:{DATA_DIR}/val.txt"
    c.train.steps = 2000
    c.train.batch_size = 12
    c.train.lr = 1e-3
    c.train.min_lr_ratio = 0.1
    c.train.warmup_steps = 100
    c.train.decay = "cosine"
    c.train.b1 = 0.9
    c.train.b2 = 0.99
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.log_every = 100
    c.train.eval_every = 250
    c.train.eval_steps = 20
    c.train.ckpt_every = 1000
    c.train.samples = ("The ",)
    return c
