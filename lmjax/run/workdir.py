"""What a run directory holds, and opening one with clear errors.

    config.json         the full config of the run (sampling needs only --workdir)
    tokenizer/          tokenizer.model (SentencePiece) or tokenizer.json + tokenizer_config.json (Hugging Face)
    checkpoints/        Orbax checkpoints (params, optimizer state, data iterator position)
    metrics.jsonl       one JSON object per logged step
    tb/                 TensorBoard event files
    loss.png            loss curves
    samples.txt         samples drawn at the end of training
"""

from pathlib import Path

from ml_collections import ConfigDict

from lmjax.config import ConfigError, LmjaxError, config_from_json
from lmjax.text.io import atomic_write, read_jsonl
from lmjax.text.tokenizer import has_tokenizer


class WorkdirError(LmjaxError, RuntimeError):
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
        atomic_write(self.config_path, cfg.to_json(indent=2))

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
    if not has_tokenizer(wd.tokenizer_dir):
        raise WorkdirError(f"{wd.path} has no tokenizer (expected tokenizer.model or tokenizer.json in "
                           f"{wd.tokenizer_dir})")
    if not wd.checkpoint_dir.is_dir() or not any(p.name.isdigit() for p in wd.checkpoint_dir.iterdir()):
        raise WorkdirError(f"{wd.path} has no checkpoint yet (train first: lmjax train --workdir {wd.path})")
    return wd


def read_metrics(jsonl_path: Path) -> list[dict]:
    """Records of metrics.jsonl (a torn last line from a killed run is ignored)."""
    if not jsonl_path.exists():
        return []
    return [record for _, record in read_jsonl(jsonl_path, skip_invalid=True)]
