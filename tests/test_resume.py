"""Resuming a run: refused config and data changes, a stable optimizer state, a pinned init_from step, and a
fine-tune start that never holds a random state beside the real one."""

import functools
import gc
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from lmjax.config import ConfigError
from lmjax.input.loaders import Loaders
from lmjax.model.params import abstract_model
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.workdir import Workdir, read_metrics
from lmjax.train import loop
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_state


def _pairs(items) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is item {i}?"}],
             "chosen": f"Item {i} is a number, thank you for asking.", "rejected": "No. Go away."} for i in items]


def _live_bytes() -> int:
    gc.collect()  # arrays of earlier tests that are garbage but not yet freed would blur the count
    return sum(a.nbytes for a in jax.live_arrays())


def _state_bytes(cfg) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) of a run of `cfg` with a 512-token vocabulary."""
    cfg.model.vocab_size = 512
    state = jax.eval_shape(functools.partial(init_state, cfg.model, make_optimizer(cfg.train), 0))
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return size(state["params"]), size(state["opt_state"])


def test_resume_refuses_config_changes_and_names_them(trained_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run[0], workdir)
    before = Workdir(workdir).config_path.read_text()
    with pytest.raises(ConfigError, match=r"Refused: data.train 'stdlib' -> 'stdlib:val'; train.lr 0.003 -> 0.001"):
        loop.train(tiny_config("train.lr=1e-3", "data.train=stdlib:val"), workdir)
    with pytest.raises(ConfigError, match=r"train.grad_clip 1.0 -> 0.0"):
        loop.train(tiny_config("train.grad_clip=0"), workdir)
    assert Workdir(workdir).config_path.read_text() == before  # a refused resume changes nothing


def test_resume_may_change_steps_and_schedule_of_logging_and_keeps_the_lr_schedule(trained_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run[0], workdir)
    result = loop.train(tiny_config("train.steps=26", "train.log_every=1", "train.eval_every=0",
                                    "train.ckpt_every=2", "train.samples="), workdir)
    assert result["step"] == 26
    saved = Workdir(workdir).load_config()
    assert saved.train.steps == 26 and saved.model.vocab_size == 512 and saved.data.loaders == 1
    # The cosine schedule keeps the 24 steps it started with: the extra steps run at its floor, not back up it.
    assert saved.train.schedule_steps == 24
    floor = saved.train.lr * saved.train.min_lr_ratio
    lrs = {r["step"]: r["lr"] for r in read_metrics(Workdir(workdir).metrics_path) if "lr" in r}
    assert lrs[25] == pytest.approx(floor) and lrs[26] == pytest.approx(floor)
    with pytest.raises(ConfigError, match=r"train.schedule_steps 24 -> 30"):
        loop.train(tiny_config("train.steps=30", "train.schedule_steps=30"), workdir)


def test_optimizer_state_has_one_structure_with_and_without_clipping():
    cfg = tiny_config()
    params = {"w": jax.numpy.ones((3, 2)), "b": jax.numpy.ones(2)}
    clipped = make_optimizer(cfg.train).init(params)
    cfg.train.grad_clip = 0.0
    assert jax.tree.structure(make_optimizer(cfg.train).init(params)) == jax.tree.structure(clipped)


def test_loader_positions_of_other_data_are_refused():
    def make(k, count, rows):
        return iter(np.arange(10))

    saved = {"loaders": 1, "fingerprint": {"loaders": 1, "data": "stdlib", "chunks": 100, "tokenizer": "abc"},
             "states": {"0": {}}}
    other = Loaders(make, 1, 8, 1, 0, 1, {"data": "stdlib", "chunks": 99, "tokenizer": "abc"})
    with pytest.raises(ConfigError, match=r"belong to other data: chunks 100 \(checkpoint\) != 99 \(now\)"):
        other.restore(saved)
    del saved["fingerprint"]
    with pytest.raises(ConfigError, match="no fingerprint"):
        other.restore(saved)


def test_init_from_shapes_are_checked_before_any_data_is_read(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(loop.specs, "texts", lambda spec: pytest.fail("data read before the shape check"))
    with pytest.raises(ConfigError, match="different model: d_model 64 \\(there\\) != 32 \\(here\\)"):
        loop.train(tiny_config(f"init_from={trained_run[0]}", "model.d_model=32"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_fine_tune_start_holds_no_random_state(trained_run, tmp_path, monkeypatch):
    """Peak live device bytes while a fine-tuning run starts stay within its parameters plus optimizer state:
    the parameters are restored straight into place and the optimizer state is built from them."""
    baseline, peaks = _live_bytes(), []
    restore_params = Checkpointer.restore_params

    def recording_restore(self, *args, **kwargs):
        params = restore_params(self, *args, **kwargs)
        peaks.append(_live_bytes() - baseline)
        return params

    def recording_run_steps(cfg, objective, state, *args):
        peaks.append(_live_bytes() - baseline)
        raise SystemExit("stop after the start")

    monkeypatch.setattr(Checkpointer, "restore_params", recording_restore)
    monkeypatch.setattr(loop, "run_steps", recording_run_steps)
    with pytest.raises(SystemExit):
        loop.train(tiny_config(f"init_from={trained_run[0]}", "train.samples="), tmp_path / "sft")
    params, opt = _state_bytes(tiny_config())
    slack = 64 * 1024  # step, RNG, token byte table
    assert len(peaks) == 2 and max(peaks) <= params + opt + slack, (peaks, params, opt)
    assert peaks[-1] >= params + opt  # the measurement sees the state


def test_dpo_resumed_after_its_source_was_extended_keeps_the_recorded_reference(trained_run, tmp_path,
                                                                                  monkeypatch):
    source = tmp_path / "sft"
    shutil.copytree(trained_run[0], source)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _pairs(range(40))))
    dpo = ["train.objective=dpo", "train.steps=1", "train.eval_every=0", "train.eval_steps=1", "train.samples=",
           "train.ckpt_every=1", f"init_from={source}", f"data.train=pairs:{data}", "data.val="]
    references = []
    init_params_from = loop.init_params_from

    def recording_init_params_from(cfg, abstract):
        params = init_params_from(cfg, abstract)
        references.append((cfg.init_from_step, params))
        return params

    monkeypatch.setattr(loop, "init_params_from", recording_init_params_from)
    loop.train(tiny_config(*dpo), tmp_path / "dpo")
    assert Workdir(tmp_path / "dpo").load_config().init_from_step == 24
    loop.train(tiny_config("train.steps=32", "train.eval_every=0", "train.samples="), source)  # extend the source
    with Checkpointer(Workdir(source).checkpoint_dir) as ckpt:
        assert ckpt.latest_step() == 32
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.
                                                               SingleDeviceSharding(jax.devices()[0])),
                                abstract_model(Workdir(source).load_config().model)[1])
        at_24, at_32 = (ckpt.restore_params(abstract, s) for s in (24, 32))
    loop.train(tiny_config(*dpo[:1], "train.steps=2", *dpo[2:]), tmp_path / "dpo")  # resume the DPO run
    step, reference = references[-1]
    assert step == 24
    jax.tree.map(np.testing.assert_array_equal, reference, at_24)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at_24), jax.tree.leaves(at_32),
                                                            strict=True))


def test_init_from_a_gpt2_run_with_another_context_is_refused_either_way(tmp_path):
    """A gpt2 model's learned position table has seq_len rows, so fine-tuning it at a longer or a shorter
    context cannot load it; refused before any checkpoint is read (the source here has none)."""
    from lmjax.run.restore import check_init_from

    source = tiny_config("model.family=gpt2", "model.seq_len=32")
    source.model.vocab_size = 512
    Workdir(tmp_path / "src").save_config(source)
    for seq_len in (16, 64):
        cfg = tiny_config("model.family=gpt2", f"model.seq_len={seq_len}", f"init_from={tmp_path / 'src'}")
        cfg.model.vocab_size = 512
        with pytest.raises(ConfigError, match=rf"seq_len 32 \(there\) != {seq_len} \(here\)"):
            check_init_from(cfg)
