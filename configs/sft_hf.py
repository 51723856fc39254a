"""sft_hf: chat fine-tuning of an imported Hugging Face model (or any run) on the embedded stdlib chat dataset.

    lmjax import hf Qwen/Qwen2.5-0.5B-Instruct --workdir runs/qwen      (or a local Hugging Face directory)
    lmjax train --config configs/sft_hf.py --config.init_from=runs/qwen --workdir runs/qwen-sft
    lmjax serve --workdir runs/qwen-sft          (or: lmjax export hf --workdir runs/qwen-sft --out hf/qwen-sft)

The model's architecture comes from init_from (`init_model`), its tokenizer and chat template too: only the
assistant's turns count in the loss. A pretrained model needs a much lower learning rate than pretraining (2e-5,
short warm-up, no weight decay) so that fine-tuning adjusts it rather than overwriting it. Contexts are cut to
512 tokens (`model.seq_len`, llama family; GPT-2 keeps its position table's length). Use your own data with
--config.data.train=chat:PATH.jsonl --config.data.val=chat:VAL.jsonl. Expect: held-out assistant loss falling
from the imported model's at the first eval (tests/test_hf_finetune.py checks it on a tiny model).
"""

from lmjax.config import base_config


def get_config():
    c = base_config()
    c.init_from = ""  # required: the imported (or pretrained) run, e.g. --config.init_from=runs/qwen
    c.init_model = True  # architecture from init_from
    c.model.seq_len = 512  # llama family: the training context (the model's own may be far longer)
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.model.dropout = 0.0
    c.data.train = "chat:stdlib"
    c.data.val = "chat:stdlib:heldout"
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.lr = 2e-5
    c.train.warmup_steps = 10
    c.train.weight_decay = 0.0
    c.train.eval_every = 100
    c.train.ckpt_every = 100
    c.train.samples = ()
    return c
