"""dpo_1b: (untested accelerator config) preference tuning (DPO) of a chat-tuned `llama_1b` run on the
ratings of its demo.

    lmjax feedback export --workdir runs/sft_1b --out prefs.jsonl
    lmjax train --config configs/dpo_1b.py --config.init_from=runs/sft_1b \\
        --config.data.train=pairs:prefs.jsonl --workdir runs/dpo_1b

An accelerator config: not trained here. The frozen reference is the init_from run; expect the held-out
preference accuracy to rise above 0.5 (it starts at 0.5: every pair ties while policy == reference).
"""

from pathlib import Path

from lmjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("sft_1b.py"))
    c.train.objective = "dpo"
    c.train.dpo_beta = 0.1
    c.data.train = ""  # required: --config.data.train=pairs:prefs.jsonl
    c.data.val = ""
    c.train.steps = 500
    c.train.batch_size = 64
    c.train.grad_accum = 4
    c.train.lr = 5e-7
    c.train.warmup_steps = 50
    c.train.eval_every = 100
    c.train.ckpt_every = 100
    return c
