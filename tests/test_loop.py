"""The trainer's edges: float16 refused, Ctrl-C twice, throughput that does not count evaluation time,
the unigram baseline counting the same targets as the model, and the compile cache between runs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding, PartitionSpec

from lmjax.config import ConfigError
from lmjax.eval.baselines import unigram_bpb
from lmjax.run.workdir import Workdir, read_metrics
from lmjax.train import loop, metrics
from lmjax.train.metrics import MetricsWriter, StartupClock, mfu_peak, spec_peak_flops
from lmjax.train.objectives import Objective


@pytest.mark.parametrize("device_kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L4", 121), ("TPU v4", 275),
    ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459), ("TPU v5p", 459), ("TPU v6 lite", 918),
    ("NVIDIA L40S", 0), ("TPU v4 lite", 0), ("cpu", 0),
])
def test_the_mfu_peak_of_an_accelerator_is_its_spec_sheet_bf16_peak(device_kind, tflops):
    assert spec_peak_flops(device_kind) == tflops * 1e12


def test_the_mfu_peak_on_cpu_is_measured_once_per_machine(tmp_path, monkeypatch):
    peak, source = mfu_peak("float32")
    assert source == "measured, float32" and peak > 1e9
    cache = tmp_path / "cache" / "matmul-peak.json"
    measured = []
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype: measured.append(dtype) or 1e10 * len(measured))
    assert mfu_peak("float32", cache) == (1e10, "measured, float32")
    assert mfu_peak("float32", cache) == (1e10, "measured, float32, earlier on this machine")
    assert mfu_peak("bfloat16", cache) == (2e10, "measured, bfloat16") and measured == ["float32", "bfloat16"]
    cache.write_text("{not json")
    assert mfu_peak("float32", cache) == (3e10, "measured, float32")
    assert list(json.loads(cache.read_text()).values()) == [3e10]  # rewritten whole


@pytest.mark.parametrize("bf16, f32, expected", [(340e9, 190e9, "bfloat16"), (199e9, 353e9, "float32"),
                                                (240e9, 190e9, "float32"), (1384e9, 298e9, "bfloat16")])
def test_auto_trains_in_bfloat16_on_a_cpu_only_where_its_matmuls_are_clearly_faster(bf16, f32, expected,
                                                                                     tmp_path, monkeypatch):
    # the measured pairs of docs/benchmarks.md: AMD EPYC, Intel Xeon without AMX, a made-up near tie, AMX
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype: {"bfloat16": bf16, "float32": f32}[dtype])
    dtype, why = metrics.training_dtype("cpu", tmp_path / "matmul-peak.json")
    assert dtype == expected and f"{bf16 / f32:.2f}x float32's" in why
    assert metrics.training_dtype("gpu", tmp_path / "matmul-peak.json")[0] == "bfloat16"


def test_with_several_processes_auto_follows_process_0s_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype: {"bfloat16": 2e11, "float32": 1e11}[dtype])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(metrics.multihost_utils, "broadcast_one_to_all", lambda x: np.float32(1.1))
    assert metrics.training_dtype("cpu", tmp_path / "matmul-peak.json")[0] == "float32"


def test_a_resumed_run_keeps_the_dtype_auto_chose_at_its_start(tmp_path, monkeypatch):
    wd = Workdir(tmp_path / "run")
    started = tiny_config("model.dtype=float32")
    started.model.vocab_size = 512
    wd.save_config(started)
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype: {"bfloat16": 4e11, "float32": 1e11}[dtype])
    assert loop.resume_config(tiny_config("model.dtype=auto"), wd).model.dtype == "float32"
    with pytest.raises(ConfigError, match="model.dtype 'float32' -> 'bfloat16'"):
        loop.resume_config(tiny_config("model.dtype=bfloat16"), wd)


def test_float16_training_is_refused_before_anything_happens(tmp_path):
    with pytest.raises(ConfigError, match="float16 cannot train.*bfloat16 or float32"):
        loop.train(tiny_config("model.dtype=float16"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_second_ctrl_c_interrupts_at_once():
    with loop._StopFlag() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is not stop._handle


class _Saves:
    def save(self, state, loaders) -> None:
        pass


def test_tokens_per_second_leave_out_evaluation_time(tmp_path):
    """Steps of 50 ms, an evaluation of 400 ms every 2 steps, a log line every 4: the logged throughput is
    that of the steps alone, 320 tokens/s. Counting the evaluations would give 64, restarting the interval
    after each one 640; the lower bound leaves room for a loaded host's overhead per step."""
    cfg = tiny_config("train.steps=8", "train.log_every=4", "train.eval_every=2", "train.batch_size=2",
                      "model.seq_len=8")
    batch = {k: np.zeros((2, 8), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}

    def step_fn(state, _):
        time.sleep(0.05)
        return state, {"loss": 1.0, "grad_norm": 1.0}

    def evaluate(params):
        time.sleep(0.4)
        return {"val_loss": 1.0}

    objective = Objective(iter(lambda: batch, None), step_fn, evaluate, lambda v: "", 1, {})
    wd = Workdir(tmp_path)
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())
    loop.run_steps(cfg, objective, {"params": {}}, 0, _Saves(), MetricsWriter(wd.metrics_path), wd, sharding,
                   1.0, 1.0, StartupClock())
    rates = [r["tokens_per_sec"] for r in read_metrics(wd.metrics_path) if "tokens_per_sec" in r]
    assert len(rates) == 2
    for rate in rates:
        assert 2 * 8 / 0.05 * 0.45 < rate < 2 * 8 / 0.05 * 1.05, rates


def test_chat_unigram_baseline_counts_only_the_assistant_tokens():
    token_bytes = np.ones(8, np.int64)
    # Prompts use token 5, replies token 6; a model of the replies alone is certain (but for smoothing).
    chunk = np.array([[1, 5, 5, 5, 6, 6], [0, 0, 0, 0, 1, 1]], np.int32)
    masked = unigram_bpb([chunk] * 50, [chunk], token_bytes)
    plain = unigram_bpb([chunk[0]] * 50, [chunk[0]], token_bytes)
    assert masked == pytest.approx(-math.log2(101 / 108))  # 100 counts of 6 + 8 add-one over 108
    assert plain > 0.5  # over all targets the baseline must also predict the prompts


def test_second_identical_run_loads_its_programs_from_the_compile_cache(tmp_path):
    """Two fresh processes train the same tiny char model with a new $LMJAX_CACHE_DIR: the first compiles and
    fills the cache, the second loads every program it needs before its first step from it."""
    (tmp_path / "train.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    cfg = ["--config", "configs/tiny.py", *[f"--config.{o}" for o in (
        "model.family=gpt2", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=0", "model.d_model=32",
        "model.d_ff=64", "model.seq_len=32", "model.dtype=float32", "tokenizer.kind=char", "train.steps=1",
        "train.batch_size=4", "train.eval_steps=1", "train.samples=", "train.peak_tflops=1",
        f"data.train=text:{tmp_path}/train.txt", f"data.val=text:{tmp_path}/train.txt")]]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["LMJAX_CACHE_DIR"] = str(tmp_path / "cache")
    first = []
    for run in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-m", "lmjax.cli", "train", *cfg, "--workdir", str(tmp_path / run)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "first step after" in proc.stdout
        # The effective config, once: tiny.py's choices and the overrides, where they differ from the defaults.
        assert "config, where it differs from the defaults: " in proc.stdout
        assert "model.d_model=32" in proc.stdout and "train.decay='wsd'" in proc.stdout
        first.append(read_metrics(tmp_path / run / "metrics.jsonl")[0])
        if run == "cold":
            assert len(list((tmp_path / "cache" / "jax-compile").iterdir())) >= first[0]["programs_compiled"] > 0
    cold, warm = first
    assert cold["compile_cache_hits"] == 0
    assert warm["compile_cache_hits"] == warm["programs_compiled"] == cold["programs_compiled"]
