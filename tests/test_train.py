"""Training: optimizer, gradient accumulation, the loop's outputs, exact resume, CLI errors.

CLI commands run in this process (`lmjax.cli.main`); a subprocess only where a signal stops a run."""

import functools
import json
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_overrides, xla_cache_env

from lmjax.cli import main
from lmjax.config import ConfigError, validate
from lmjax.model.params import abstract_model, init_params
from lmjax.parallel.rules import path_names
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.workdir import Workdir
from lmjax.train.loop import train
from lmjax.train.optim import decay_mask, lr_schedule, make_optimizer, muon_dimensions
from lmjax.train.step import init_state, train_step

LMJAX = [sys.executable, "-m", "lmjax.cli"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lmjax ARGS` run in this process."""
    capsys.readouterr()
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def config_args(*overrides: str) -> list[str]:
    """`--config` arguments of `tiny_overrides()` and then `overrides`."""
    return ["--config", "configs/tiny.py", *[f"--config.{o}" for o in tiny_overrides() + list(overrides)]]


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_config("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1").train
    lr = lr_schedule(cfg)
    assert float(lr(0)) == pytest.approx(1 / 11) and float(lr(10)) == pytest.approx(1.0)  # no step at lr 0
    assert float(lr(55)) < 1.0 and float(lr(100)) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
    _, shapes, _ = abstract_model(_with_vocab(tiny_config("model.family=gpt2").model))
    mask = decay_mask(shapes)
    assert mask["blocks"][0]["attn"]["query"] and not mask["blocks"][0]["attn"]["query_bias"]
    assert not mask["blocks"][0]["attn_norm"]["scale"] and mask["embed"]


def _with_vocab(model_cfg, vocab: int = 64):
    model_cfg.vocab_size = vocab
    return model_cfg


def _random_batch(rng, accum, micro, length, vocab):
    tokens = rng.integers(0, vocab, (accum, micro, length + 1)).astype(np.int32)
    seg = np.ones((accum, micro, length), np.int32)
    seg[..., length - 5:] = 0  # padding tail must not count
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), seg.shape).copy()}


def test_gradient_accumulation_matches_one_big_batch():
    cfg = tiny_config()
    model_cfg = _with_vocab(cfg.model)
    graphdef, _, _ = abstract_model(model_cfg)
    tx = make_optimizer(cfg.train)
    state = init_state(model_cfg, tx, 0)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False))
    big = _random_batch(np.random.default_rng(0), 1, 8, 16, 64)
    split = {k: v.reshape(4, 2, 16) for k, v in big.items()}
    s1, m1 = step(state, big)
    s4, m4 = step(state, split)
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
    assert float(m1["tokens"]) == 8 * 11
    # Compare the gradients, through Adam's first moment (0.1 g after one step): the first update itself is
    # ~lr * sign(g), which flips with the summation order wherever g is ~0.
    first_moments = lambda s: [x for path, x in jax.tree_util.tree_flatten_with_path(s["opt_state"])[0]
                               if "mu" in path_names(path)]
    pairs = list(zip(first_moments(s1), first_moments(s4), strict=True))
    assert pairs
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=1e-8)


def test_training_run_writes_metrics_plot_checkpoints_and_samples(trained_run):
    workdir, result = trained_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert train_losses[-1] < train_losses[0] - 0.5, train_losses
    for key in ("step", "train_loss", "tokens_per_sec", "mfu", "elapsed_s"):
        assert key in records[-1]
    assert {"val_loss", "val_bpb", "val_ppl"} <= records[-1].keys()
    assert result["val_bpb"] == records[-1]["val_bpb"] and result["step"] == 24
    assert (workdir / "loss.png").stat().st_size > 1000
    assert any((workdir / "tb").iterdir())
    assert (workdir / "samples.txt").read_text().startswith("--- 'The'")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [8, 16, 24]
    assert (workdir / "tokenizer" / "tokenizer.model").is_file() and (workdir / "config.json").is_file()


def test_sample_cli_reads_only_the_workdir(trained_run, capsys):
    workdir, _ = trained_run
    status, out, err = run_cli(capsys, "sample", "--workdir", str(workdir), "--prompt", "Return the",
                               "--max-new-tokens", "12", "--num-samples", "2", "--seed", "3")
    assert status == 0, err
    assert out.count("Return the") == 2 and "--- sample 2" in out


def _losses(workdir) -> list[tuple[int, float]]:
    """(step, train loss) of every line of the run's metrics.jsonl that has one, in order."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def _final_params_and_losses(workdir):
    """(latest checkpoint step, its parameters, `_losses`) of a run."""
    ckpt = Checkpointer(workdir / "checkpoints")
    _, shapes, _ = abstract_model(Workdir(workdir).load_config().model)
    params = jax.device_get(ckpt.restore_params(shapes))
    step = ckpt.latest_step()
    ckpt.close()
    return step, params, _losses(workdir)


def _assert_same_run(a, b, steps: int) -> None:
    """Runs `a` and `b` both reached `steps`, with identical parameters and one identical loss per step."""
    (step_a, params_a, losses_a), (step_b, params_b, losses_b) = map(_final_params_and_losses, (a, b))
    assert step_a == step_b == steps
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        assert np.array_equal(x, y)
    assert losses_a == losses_b and [step for step, _ in losses_a] == list(range(1, steps + 1))


def test_resume_after_kill_is_bit_identical(tmp_path, capsys):
    """An uninterrupted run and one killed with SIGKILL mid-way then resumed end with identical parameters."""
    extra = ["train.steps=16", "train.ckpt_every=4", "train.log_every=1", "train.eval_every=0", "train.samples="]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    status, _, err = run_cli(capsys, "train", *config_args(*extra), "--workdir", str(straight))
    assert status == 0, err

    proc = subprocess.Popen([*LMJAX, "train", *config_args(*extra), "--workdir", str(resumed)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=xla_cache_env())
    for line in proc.stdout:
        if line.startswith("step     10/16"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    status, out, err = run_cli(capsys, "train", "--workdir", str(resumed))
    assert status == 0, err
    assert "resumed from checkpoint at step" in out
    _assert_same_run(straight, resumed, 16)


def test_resume_with_dropout_is_bit_identical(tmp_path):
    """With dropout on, 8 steps in one go equal 4 steps then a resume to 8: each step's dropout masks come
    from the checkpointed RNG and the step number, not from the process that runs it. (A constant learning
    rate after warm-up, so that raising train.steps changes no step before it.)"""
    extra = ["model.dropout=0.1", "train.decay=constant", "train.warmup_steps=2", "train.ckpt_every=100",
             "train.log_every=1", "train.eval_every=0", "train.samples="]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(*extra, "train.steps=8"), straight)
    assert train(tiny_config(*extra, "train.steps=4"), resumed)["step"] == 4
    assert train(tiny_config(*extra, "train.steps=8"), resumed)["step"] == 8
    _assert_same_run(straight, resumed, 8)
    train(tiny_config(*extra, "model.dropout=0", "train.steps=1"), tmp_path / "no_dropout")
    assert _losses(tmp_path / "no_dropout")[0] != _losses(straight)[0]  # the same first batch: dropout was on


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, capsys):
    extra = ["train.steps=400", "train.ckpt_every=1000", "train.log_every=1", "train.eval_every=0",
             "train.samples="]
    workdir = tmp_path / "run"
    proc = subprocess.Popen([*LMJAX, "train", *config_args(*extra), "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=xla_cache_env())
    for line in proc.stdout:
        if line.startswith("step      3/400"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, rest
    assert "SIGTERM: checkpoint saved at step" in rest
    ckpt = Checkpointer(workdir / "checkpoints")
    saved = ckpt.latest_step()
    ckpt.close()
    assert saved is not None and 3 <= saved < 400
    status, out, err = run_cli(capsys, "train", "--workdir", str(workdir), "--config.train.steps", str(saved + 2))
    assert status == 0, err
    assert f"resumed from checkpoint at step {saved}" in out


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "no config.json"),
    ("no_checkpoint", "no checkpoint yet"),
    ("corrupt_config", "unreadable"),
])
def test_sample_on_a_bad_workdir_gives_a_clear_error(tmp_path, trained_run, capsys, setup, message):
    workdir = tmp_path / "w"
    if setup != "missing":
        workdir.mkdir()
    if setup in ("no_checkpoint", "corrupt_config"):
        (workdir / "config.json").write_text((trained_run[0] / "config.json").read_text())
        (workdir / "tokenizer").mkdir()
        (workdir / "tokenizer" / "tokenizer.model").write_bytes(
            (trained_run[0] / "tokenizer" / "tokenizer.model").read_bytes())
    if setup == "corrupt_config":
        (workdir / "config.json").write_text('{"model": ')
    status, _, err = run_cli(capsys, "sample", "--workdir", str(workdir), "--prompt", "x")
    assert status == 2 and err.startswith("lmjax: error: ") and message in err and err.count("\n") == 1, err


def test_corrupt_checkpoint_gives_a_clear_error_and_keeps_the_files(tmp_path, trained_run, capsys):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(trained_run[0], workdir)
    latest = workdir / "checkpoints" / "24" / "params"
    victims = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 0 and "metadata" not in p.name]
    for p in victims:
        p.write_bytes(b"\0garbage" * 4)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    status, _, err = run_cli(capsys, "sample", "--workdir", str(workdir), "--prompt", "x")
    assert status == 2 and "checkpoint step 24" in err and err.count("\n") == 1, err
    assert "earlier steps: [8, 16]" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    status, out, err = run_cli(capsys, "sample", "--workdir", str(workdir), "--prompt", "x", "--step", "16",
                               "--max-new-tokens", "4")
    assert status == 0 and out.startswith("x"), err


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    status, _, err = run_cli(capsys, "train", "--config", "configs/tiny.py", "--config.model.num_layerz=2",
                             "--workdir", str(tmp_path))
    assert status == 2 and "unknown config key 'model.num_layerz'" in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # refused before the run directory was touched


def test_plan_cli_reports_sharded_memory(capsys):
    status, out, err = run_cli(capsys, "plan", "--config", "configs/llama_7b.py", "--devices", "256",
                               "--device-memory-gb", "16")
    assert status == 0, err
    assert "6,738,415,616" in out and "'fsdp': 256" in out
    assert "fits 16 GB per device: yes" in out  # with the config's remat=full and grad_accum=4


def test_wsd_schedule_holds_the_peak_then_cools_down_linearly():
    cfg = tiny_config("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1",
                      "train.decay=wsd", "train.cooldown_fraction=0.2").train
    lr = lr_schedule(cfg)
    assert float(lr(5)) == pytest.approx(6 / 11) and float(lr(10)) == float(lr(79)) == pytest.approx(1.0)
    assert float(lr(90)) == pytest.approx(0.55) and float(lr(100)) == pytest.approx(0.1)


def test_muon_orthogonalises_the_block_matrices_and_adamw_takes_the_rest():
    cfg = tiny_config("train.optimizer=muon", "train.warmup_steps=0", "train.weight_decay=0", "train.grad_clip=0")
    _, shapes, _ = abstract_model(_with_vocab(cfg.model))
    dims = muon_dimensions(shapes)
    assert dims["blocks"][0]["attn"]["out"].reduction_axis == (-3, -2) and dims["blocks"][0]["mlp"]["down"]
    assert dims["embed"] is None and dims["lm_head"] is None and dims["blocks"][0]["attn_norm"]["scale"] is None
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    tx = make_optimizer(cfg.train)
    updates, _ = tx.update(grads, tx.init(params), params)
    query = np.asarray(updates["blocks"][0]["attn"]["query"]).reshape(cfg.model.d_model, -1)
    singular = np.linalg.svd(query / np.abs(query).max(), compute_uv=False)
    # orthogonalised: a flat spectrum, all but the smallest few singular values within 2x of the largest (5
    # Newton-Schulz steps leave the very smallest behind); a random matrix's spread from 0 to the largest
    assert np.percentile(singular, 10) > 0.5 * singular.max()
    raw = np.linalg.svd(np.asarray(grads["blocks"][0]["attn"]["query"]).reshape(cfg.model.d_model, -1),
                        compute_uv=False)
    assert np.percentile(raw, 10) < 0.3 * raw.max()
    with pytest.raises(ConfigError, match="optimizer=adamw"):
        validate(tiny_config("train.optimizer=muon", "train.lora.rank=4", "init_from=x"))


def test_fewer_newton_schulz_steps_orthogonalise_less():
    cfg = tiny_config("train.optimizer=muon", "train.warmup_steps=0", "train.weight_decay=0", "train.grad_clip=0")
    params = init_params(_with_vocab(cfg.model), jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params)

    def spread(ns_steps: int) -> float:
        cfg.train.muon_ns_steps = ns_steps
        tx = make_optimizer(cfg.train)
        query = np.asarray(tx.update(grads, tx.init(params), params)[0]["blocks"][0]["attn"]["query"])
        singular = np.linalg.svd(query.reshape(cfg.model.d_model, -1), compute_uv=False)
        return float(np.percentile(singular, 10) / singular.max())

    assert spread(1) < 0.5 < spread(5)
    with pytest.raises(ConfigError, match="muon_ns_steps"):
        validate(tiny_config("train.muon_ns_steps=0"))
