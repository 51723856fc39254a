"""dpo_tiny: preference tuning (DPO) of a chat-tuned `tiny` run on the ratings and edits of its demo.

    lmjax train --config configs/sft_tiny.py --config.init_from=runs/pretrain --workdir runs/sft
    lmjax demo --workdir runs/sft        (like and dislike replies, edit disliked ones)
    lmjax feedback export --workdir runs/sft --out prefs.jsonl
    lmjax train --config configs/dpo_tiny.py --config.init_from=runs/sft --config.data.train=jsonl:prefs.jsonl \\
        --workdir runs/dpo

`data.train` is JSONL of {"prompt": messages, "chosen": text, "rejected": text}; every 10th pair is held
out (or set data.val=jsonl:OTHER). The policy starts from init_from, which stays frozen as the reference.
Expect the held-out preference accuracy to rise above 0.5 and the log-ratio margin above 0 (both start
at chance / 0 since policy == reference); on the checkpoints, resume works as for any run.
"""

from pathlib import Path

from lmjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("sft_tiny.py"))
    c.init_from = ""  # required: the chat-tuned run, e.g. --config.init_from=runs/sft
    c.train.objective = "dpo"
    c.train.dpo_beta = 0.1
    c.data.train = ""  # required: --config.data.train=jsonl:prefs.jsonl
    c.data.val = ""
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.lr = 1e-5
    c.train.warmup_steps = 10
    c.train.eval_every = 50
    c.train.ckpt_every = 50
    return c
