"""`lmjax lora merge`: a LoRA run in, an ordinary run directory out whose weights are the base with the
adapters folded in (W + alpha / r x a b), for inference and export without the adapter path.

The new run has the LoRA run's tokenizer, its config with `train.lora` back at the defaults (rank 0; init_from
still names the base it fine-tuned) and one checkpoint of parameters alone at the LoRA run's step, like a
compressed run. It is written under a temporary name and renamed when complete (`new_directory`).
"""

import shutil
from pathlib import Path

from lmjax.config import ConfigError, base_config
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.restore import restore_model
from lmjax.run.workdir import Workdir, open_workdir
from lmjax.text.io import new_directory


def merge_run(workdir: str | Path, out: str | Path, step: int | None = None) -> int:
    """Writes checkpoint `step` (default latest) of the LoRA run `workdir`, merged, as the run `out`; returns
    the step."""
    with new_directory(out) as staging:
        wd = open_workdir(workdir)
        cfg = wd.load_config()
        if cfg.train.lora.rank == 0:
            raise ConfigError(f"{wd.path} is not a LoRA run (train.lora.rank is 0): nothing to merge")
        _, _, params, _, step = restore_model(wd, step, merge_lora=True)
        cfg.train.lora = base_config().train.lora
        new = Workdir(staging)
        shutil.copytree(wd.tokenizer_dir, new.tokenizer_dir)
        new.save_config(cfg)
        with Checkpointer(new.checkpoint_dir) as ckpt:
            ckpt.save_params(step, params)
    return step
