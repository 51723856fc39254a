"""dpo_tiny: preference tuning (DPO) of a chat-tuned `tiny` run on the ratings and edits of its demo.

    lmjax train --config configs/sft_tiny.py --config.init_from=runs/pretrain --workdir runs/sft
    lmjax demo --workdir runs/sft        (like and dislike replies, edit disliked ones)
    lmjax feedback export --workdir runs/sft --out prefs.jsonl
    lmjax train --config configs/dpo_tiny.py --config.init_from=runs/sft --config.data.train=pairs:prefs.jsonl \\
        --workdir runs/dpo

`data.train` is JSONL of {"prompt": messages, "chosen": text, "rejected": text}; the pairs of 10% of the
prompts (by a hash of the prompt, so no prompt is on both sides) are held out, or set data.val=pairs:OTHER.
The policy starts from init_from's checkpoint (its step is recorded in config.json), which stays frozen as
the reference. The held-out preference accuracy starts at 0.5 (every pair a tie: policy == reference) and
the log-ratio margin at 0; expect both to rise; on the checkpoints, resume works as for any run.
"""

from pathlib import Path

from lmjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("sft_tiny.py"))
    c.init_from = ""  # required: the chat-tuned run, e.g. --config.init_from=runs/sft
    c.train.objective = "dpo"
    c.train.dpo_beta = 0.1
    c.data.train = ""  # required: --config.data.train=pairs:prefs.jsonl
    c.data.val = ""
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.lr = 1e-5
    c.train.warmup_steps = 10
    c.train.eval_every = 50
    c.train.ckpt_every = 50
    return c
