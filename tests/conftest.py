"""Shared fixtures: a tiny config and one trained run reused by the end-to-end tests."""

import pytest
from ml_collections import ConfigDict

from lmjax.config import apply_overrides, base_config

# A model small enough to train tens of steps in seconds on one CPU core; also usable on the command
# line as `--config.KEY=VALUE` arguments.
TINY_OVERRIDES = [
    "model.family=llama", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=64",
    "model.d_ff=128", "model.seq_len=64", "model.dtype=float32", "tokenizer.vocab_size=512",
    "train.steps=24", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=4", "train.log_every=4",
    "train.eval_every=12", "train.eval_steps=2", "train.ckpt_every=8", "train.peak_tflops=1.0",
    "train.samples=The",
]


def tiny_config(*overrides: str) -> ConfigDict:
    """`TINY_OVERRIDES` on the defaults, then `overrides`."""
    return apply_overrides(base_config(), TINY_OVERRIDES + list(overrides))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(workdir, result) of a 24-step run of `tiny_config` on the stdlib corpus."""
    from lmjax.train.loop import train

    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    result = train(tiny_config(), workdir)
    return workdir, result
