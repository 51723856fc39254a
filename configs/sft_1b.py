"""sft_1b: (untested accelerator config) chat fine-tuning of a pretrained `llama_1b` run (the quickstart's
SFT step at accelerator scale).

    lmjax train --config configs/sft_1b.py --config.init_from=runs/llama_1b --workdir runs/sft_1b \\
        --config.data.train='chat:/data/chat/*.jsonl'

Conversations are JSONL lines {"messages": [{"role": ..., "content": ...}, ...]} (any open chat dataset
converted to that format, or `lmjax chat-data --package ...` for your own packages); only assistant replies
count in the loss. Held out: the embedded stdlib chat questions about modules never seen in fine-tuning.
An accelerator config: not trained here. Expect `lmjax eval chat` ROUGE-L well above the pretrained run's.
"""

from pathlib import Path

from lmjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("llama_1b.py"))
    c.init_from = ""  # required: the pretrained run, e.g. --config.init_from=runs/llama_1b
    c.data.train = "chat:stdlib"
    c.data.val = "chat:stdlib:heldout"
    c.train.steps = 2000
    c.train.batch_size = 128
    c.train.grad_accum = 4
    c.train.lr = 2e-5
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.0
    c.train.eval_every = 500
    c.train.ckpt_every = 500
    c.train.samples = ()
    return c
