"""Training: optimizer, gradient accumulation, the loop's outputs, exact resume, CLI errors."""

import functools
import json
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TINY_OVERRIDES, tiny_config

from lmjax.model.params import abstract_model
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.optim import decay_mask, lr_schedule, make_optimizer
from lmjax.train.step import init_state, train_step

LMJAX = [sys.executable, "-m", "lmjax.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LMJAX, *args], capture_output=True, text=True, timeout=timeout)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_config("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1").train
    lr = lr_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
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
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


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


def test_sample_cli_reads_only_the_workdir(trained_run):
    workdir, _ = trained_run
    out = run_cli("sample", "--workdir", str(workdir), "--prompt", "Return the", "--max-new-tokens", "12",
                  "--num-samples", "2", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Return the") == 2 and "--- sample 2" in out.stdout


def test_resume_after_kill_is_bit_identical(tmp_path):
    """An uninterrupted run and one killed with SIGKILL mid-way then resumed end with identical parameters."""
    extra = ["train.steps=16", "train.ckpt_every=4", "train.log_every=1", "train.eval_every=0", "train.samples="]
    overrides = [f"--config.{o}" for o in TINY_OVERRIDES + extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run_cli("train", "--config", "configs/tiny.py", *overrides, "--workdir", str(straight))
    assert out.returncode == 0, out.stderr

    proc = subprocess.Popen([*LMJAX, "train", "--config", "configs/tiny.py", *overrides, "--workdir", str(resumed)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step     10/16"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    out = run_cli("train", "--workdir", str(resumed))
    assert out.returncode == 0, out.stderr
    assert "resumed from checkpoint at step" in out.stdout

    params = []
    for workdir in (straight, resumed):
        ckpt = Checkpointer(workdir / "checkpoints")
        assert ckpt.latest_step() == 16
        _, shapes, _ = abstract_model(_vocab_from(workdir))
        params.append(jax.device_get(ckpt.restore_params(shapes)))
        ckpt.close()
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        assert np.array_equal(a, b)
    losses = [[json.loads(line)["train_loss"] for line in (w / "metrics.jsonl").read_text().splitlines()]
              for w in (straight, resumed)]
    assert losses[0] == losses[1]


def _vocab_from(workdir):
    from lmjax.workdir import Workdir

    return Workdir(workdir).load_config().model


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    extra = ["train.steps=400", "train.ckpt_every=1000", "train.log_every=1", "train.eval_every=0",
             "train.samples="]
    workdir = tmp_path / "run"
    proc = subprocess.Popen([*LMJAX, "train", "--config", "configs/tiny.py",
                             *[f"--config.{o}" for o in TINY_OVERRIDES + extra], "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    out = run_cli("train", "--workdir", str(workdir), "--config.train.steps", str(saved + 2))
    assert out.returncode == 0, out.stderr
    assert f"resumed from checkpoint at step {saved}" in out.stdout


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "no config.json"),
    ("no_checkpoint", "no checkpoint yet"),
    ("corrupt_config", "unreadable"),
])
def test_sample_on_a_bad_workdir_gives_a_clear_error(tmp_path, trained_run, setup, message):
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
    out = run_cli("sample", "--workdir", str(workdir), "--prompt", "x")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_corrupt_checkpoint_gives_a_clear_error_and_keeps_the_files(tmp_path, trained_run):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(trained_run[0], workdir)
    latest = workdir / "checkpoints" / "24" / "params"
    victims = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 0 and "metadata" not in p.name]
    for p in victims:
        p.write_bytes(b"\0garbage" * 4)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    out = run_cli("sample", "--workdir", str(workdir), "--prompt", "x")
    assert out.returncode == 2 and "checkpoint step 24" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "earlier steps: [8, 16]" in out.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    out = run_cli("sample", "--workdir", str(workdir), "--prompt", "x", "--step", "16", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr


def test_cli_config_errors_are_one_line(tmp_path):
    out = run_cli("train", "--config", "configs/tiny.py", "--config.model.num_layerz=2", "--workdir", str(tmp_path))
    assert out.returncode == 2 and "unknown config key 'model.num_layerz'" in out.stderr
    assert "Traceback" not in out.stderr


def test_plan_cli_reports_sharded_memory():
    out = run_cli("plan", "--config", "configs/llama_7b.py", "--devices", "256", "--device-memory-gb", "16")
    assert out.returncode == 0, out.stderr
    assert "6,738,415,616" in out.stdout and "'fsdp': 256" in out.stdout
    assert "fits 16 GB per device: yes" in out.stdout  # with the config's remat=full and grad_accum=4
