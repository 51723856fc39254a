"""`lmjax compress`: a trained run in, a new run directory out with pruned and/or quantized weights.

The new run has the source's tokenizer, its config with the `compress.*` group filled in (what was done, from
which run and step) and one checkpoint holding only parameters, at the source's step; `sample`, `chat`,
`demo` and `serve` load it like any run (lmjax/run/restore.py rebuilds the quantized tree from `compress.*`).
Pruning runs first, on float32 weights, then quantization (pruned zeros stay exact zeros). The directory is
written under a temporary name and renamed when complete (`new_directory`), and an existing run is never
overwritten.
"""

import dataclasses
import functools
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lmjax.compress.prune import input_norms, prune_params, sparsity_of
from lmjax.config import QUANT_FORMATS, ConfigError, base_config, validate
from lmjax.input.packing import eval_batches
from lmjax.input.specs import open_chunks
from lmjax.model.quantized import quantize_params
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.restore import restore_model
from lmjax.run.workdir import Workdir, open_workdir
from lmjax.text.io import new_directory

CALIBRATION_ROWS = 8  # rows of model.seq_len tokens per calibration batch


@dataclasses.dataclass(frozen=True)
class Compression:
    """What to do to a run's weights (the `compress.*` knobs that `lmjax compress` sets)."""

    quant: str = ""  # "", "int8" or "int4"
    group_size: int = 0  # contracted rows per scale; 0 = per output channel
    prune: str = ""  # "", "magnitude" or "wanda"
    sparsity: float = 0.0  # share of block projection weights to zero
    pattern: str = ""  # N:M pattern instead of sparsity
    calibration: str = ""  # data spec for Wanda ("" = the source run's data.val)
    calibration_batches: int = 8  # calibration batches
    cache_dtype: str = ""  # KV cache dtype of the new run (model.cache_dtype); "" = keep the source's

    def check(self) -> None:
        """ConfigError for a combination that makes no sense."""
        if self.quant not in QUANT_FORMATS:
            raise ConfigError(f"--quant must be int8 or int4, got {self.quant!r}")
        if not self.quant and not self.prune and not self.cache_dtype:
            raise ConfigError("nothing to do: give --quant, --prune and/or --kv-cache-dtype")
        if self.prune and not self.sparsity and not self.pattern:
            raise ConfigError("--prune needs --sparsity (e.g. 0.5) or --pattern (e.g. 2:4)")
        if (self.sparsity or self.pattern) and not self.prune:
            raise ConfigError("--sparsity/--pattern need --prune magnitude|wanda")
        if self.sparsity and self.pattern:
            raise ConfigError("give --sparsity or --pattern, not both")
        if self.group_size and self.quant != "int4":
            raise ConfigError("--group-size applies to int4 (int8 is per output channel)")


def compress_run(source: str | Path, out: str | Path, compression: Compression, step: int | None = None) -> dict:
    """Writes the compressed run `out` from checkpoint `step` (default latest) of `source`; returns a summary
    (sizes in bytes, sparsity, seconds)."""
    compression.check()
    start = time.time()
    with new_directory(out) as staging:
        wd = open_workdir(source)
        cfg = wd.load_config()
        if cfg.compress.source:
            raise ConfigError(f"{wd.path} is itself compressed (from {cfg.compress.source}); compress the float run")
        _, _, params, tokenizer, step = restore_model(wd, step, merge_lora=True)  # a LoRA run: its merged weights
        cfg.train.lora = base_config().train.lora
        cfg.model.scan_layers = False  # restore_model unrolls a scanned run's layers
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        if compression.prune:
            norms = None
            if compression.prune == "wanda":
                spec = compression.calibration or cfg.data.val
                print(f"calibrating on {spec} ({compression.calibration_batches} batches)", file=sys.stderr)
                chunks = open_chunks(spec, tokenizer, cfg.model.seq_len, log=functools.partial(print, file=sys.stderr))
                batches = eval_batches(chunks, cfg.model.seq_len, CALIBRATION_ROWS, compression.calibration_batches)
                norms = input_norms(cfg.model, params, batches)
            params = prune_params(params, compression.prune, compression.sparsity, compression.pattern, norms)
        if compression.quant:
            params = quantize_params(params, compression.quant, compression.group_size)
        settings = dataclasses.asdict(compression)
        cfg.model.cache_dtype = settings.pop("cache_dtype") or cfg.model.cache_dtype
        cfg.compress.update(source=str(wd.path.absolute()), source_step=step, **settings)
        validate(cfg)
        new = Workdir(staging)
        shutil.copytree(wd.tokenizer_dir, new.tokenizer_dir)
        new.save_config(cfg)
        with Checkpointer(new.checkpoint_dir) as ckpt:
            ckpt.save_params(step, params)
    return {"out": str(out), "step": step, "source_bytes": _size(wd.checkpoint_dir / str(step) / "params"),
            "bytes": _size(Workdir(out).checkpoint_dir / str(step) / "params"),
            "sparsity": sparsity_of(params), "seconds": time.time() - start}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
