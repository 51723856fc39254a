"""What a run directory holds, and opening one with clear errors.

    config.json         the full config of the run (sampling needs only --workdir)
    tokenizer/          tokenizer.model
    checkpoints/        Orbax checkpoints (params, optimizer state, data iterator position)
    metrics.jsonl       one JSON object per logged step
    tb/                 TensorBoard event files
    loss.png            loss curves
    samples.txt         samples drawn at the end of training
"""

import os
from pathlib import Path

import jax
from ml_collections import ConfigDict

from lmjax.config import ConfigError, config_from_json
from lmjax.data.tokenizer import Tokenizer
from lmjax.model.params import abstract_model
from lmjax.train.checkpoint import Checkpointer


class WorkdirError(RuntimeError):
    """A run directory that is missing, empty or unreadable."""


class Workdir:
    """Paths of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.tokenizer_dir = self.path / "tokenizer"
        self.checkpoint_dir = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.tb_dir = self.path / "tb"
        self.plot_path = self.path / "loss.png"
        self.samples_path = self.path / "samples.txt"

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def save_config(self, cfg: ConfigDict) -> None:
        """Writes config.json atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".json.tmp")
        tmp.write_text(cfg.to_json(indent=2))
        os.replace(tmp, self.config_path)

    def load_config(self) -> ConfigDict:
        if not self.has_config():
            raise WorkdirError(f"{self.path} is not an lmjax run directory (no config.json)")
        try:
            return config_from_json(self.config_path.read_text())
        except ConfigError as e:
            raise WorkdirError(f"{self.config_path} is unreadable: {e}") from e


def open_workdir(path: str | Path) -> Workdir:
    """An existing, trained run directory (config, tokenizer and at least one checkpoint present)."""
    wd = Workdir(path)
    if not wd.path.is_dir():
        raise WorkdirError(f"run directory {wd.path} does not exist")
    wd.load_config()
    if not (wd.tokenizer_dir / "tokenizer.model").is_file():
        raise WorkdirError(f"{wd.path} has no tokenizer (expected {wd.tokenizer_dir / 'tokenizer.model'})")
    if not wd.checkpoint_dir.is_dir() or not any(p.name.isdigit() for p in wd.checkpoint_dir.iterdir()):
        raise WorkdirError(f"{wd.path} has no checkpoint yet (train first: lmjax train --workdir {wd.path})")
    return wd


def restore_model(wd: Workdir, step: int | None = None):
    """(config, graphdef, params, tokenizer) of a trained run, params from checkpoint `step` (default
    latest), on the default device. Raises WorkdirError / CheckpointError with a clear message."""
    cfg = wd.load_config()
    tokenizer = Tokenizer.load(wd.tokenizer_dir)
    graphdef, abstract_params, _ = abstract_model(cfg.model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                   abstract_params)
    ckpt = Checkpointer(wd.checkpoint_dir)
    try:
        params = ckpt.restore_params(abstract_params, step)
    finally:
        ckpt.close()
    return cfg, graphdef, params, tokenizer


SHAPE_KEYS = ("family", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_model", "d_ff",
              "tie_embeddings", "param_dtype")


def init_params_from(cfg: ConfigDict, abstract_params):
    """Parameters of the latest checkpoint of the run `cfg.init_from`, after checking its model shapes."""
    source = Workdir(cfg.init_from)
    source_model = source.load_config().model
    diff = {k: (source_model[k], cfg.model[k]) for k in SHAPE_KEYS if source_model[k] != cfg.model[k]}
    if cfg.model.family == "gpt2" and source_model.seq_len < cfg.model.seq_len:
        diff["seq_len"] = (source_model.seq_len, cfg.model.seq_len)
    if diff:
        raise ConfigError(f"init_from {source.path} has a different model: "
                          + ", ".join(f"{k} {a} (there) != {b} (here)" for k, (a, b) in diff.items()))
    ckpt = Checkpointer(source.checkpoint_dir)
    try:
        return ckpt.restore_params(abstract_params)
    finally:
        ckpt.close()
