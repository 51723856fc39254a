"""Run metrics: metrics.jsonl, TensorBoard events, console progress, MFU and the loss-curve plot."""

import json
import math
import os
import platform
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lmjax.corpus.stdlib_docs import cache_dir
from lmjax.text.io import atomic_write

# JAX's monitoring events (jax.monitoring) for one XLA compilation or its load from the persistent compilation
# cache, and for a hit in that cache.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def measure_matmul_peak(dtype: str = "bfloat16", size: int = 2048, reps: int = 7) -> float:
    """Measured FLOP/s of one device on a square matmul in `dtype` with float32 accumulation: the
    denominator of MFU (on CPUs, where no spec sheet applies). Median of `reps` timed runs."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times))


# Dense bfloat16 TFLOP/s per chip from the vendors' spec sheets (without sparsity), by a pattern of JAX's
# `device_kind`; the first match wins, so variants come before their family.
PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H[12]00 NVL", 835.0),
    (r"H100|H200", 989.0),  # SXM
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
    (r"^TPU v4$", 275.0),
    (r"^TPU v5 ?(lite|e)$", 197.0),  # v5e
    (r"^TPU v5p?$", 459.0),  # v5p
    (r"^TPU v6 ?(lite|e)$", 918.0),  # v6e (Trillium)
)


def spec_peak_flops(device_kind: str) -> float:
    """Peak bfloat16 FLOP/s of one chip of `device_kind` by `PEAK_TFLOPS`; 0.0 for a kind it does not list."""
    return next((tflops * 1e12 for pattern, tflops in PEAK_TFLOPS if re.search(pattern, device_kind)), 0.0)


def mfu_peak(dtype: str, cache: Path | None = None) -> tuple[float, str]:
    """The denominator of MFU and where it comes from: the spec-sheet bfloat16 peak of a known GPU / TPU, else
    (CPUs, unlisted accelerators) a matmul in `dtype` measured on this machine. With `cache` (a JSON file), a
    measurement is kept there by machine (device, CPU model and count, JAX version, dtype) and later runs on the
    same machine read it instead of measuring again (~1 s of start-up); an unreadable file is measured over."""
    device = jax.devices()[0]
    if device.platform != "cpu" and (peak := spec_peak_flops(device.device_kind)):
        return peak, f"{device.device_kind} spec sheet, bfloat16"
    if cache is None:
        return measure_matmul_peak(dtype), f"measured, {dtype}"
    key = "|".join((device.platform, device.device_kind, _cpu_model(), str(os.cpu_count()), jax.__version__, dtype))
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if isinstance(known.get(key), float):
        return known[key], f"measured, {dtype}, earlier on this machine"
    known[key] = measure_matmul_peak(dtype)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps(known, indent=1))
    return known[key], f"measured, {dtype}"


# How much faster bfloat16 square matmuls must run than float32 ones before a CPU trains in bfloat16: the
# elementwise work around each matmul costs more in bfloat16 (XLA:CPU widens it), which eats part of the gain.
# Measured end to end: a 1.75x matmul ratio gave 1.33x tokens/s at d512 and ~1.2x on `tiny` (AMD EPYC, no
# AMX); a 0.56x ratio gave float32 1.32x (Intel Xeon, no AMX) (docs/benchmarks.md, section 1).
BF16_MATMUL_ADVANTAGE = 1.3


def peak_cache() -> Path:
    """Where `mfu_peak` keeps this machine's measured matmul peaks (in the lmjax cache directory)."""
    return cache_dir() / "matmul-peak.json"


def training_dtype(backend: str, cache: Path | None = None) -> tuple[str, str]:
    """`model.dtype=auto` for training, with the reason: bfloat16 on accelerators; on a CPU, bfloat16 when its
    measured bfloat16 matmul peak is at least `BF16_MATMUL_ADVANTAGE` times its float32 one, else float32. The
    peaks are `mfu_peak`'s (measured once per machine with `cache`); with several processes, process 0's
    choice holds for all, so that a noisy measurement cannot split the run between dtypes."""
    if backend != "cpu":
        return "bfloat16", f"on {backend}"
    bf16, f32 = mfu_peak("bfloat16", cache)[0], mfu_peak("float32", cache)[0]
    ratio = bf16 / f32
    if jax.process_count() > 1:
        ratio = float(multihost_utils.broadcast_one_to_all(np.float32(ratio)))
    dtype = "bfloat16" if ratio >= BF16_MATMUL_ADVANTAGE else "float32"
    return dtype, (f"bfloat16 matmuls measured at {ratio:.2f}x float32's on this CPU; bfloat16 needs "
                   f"{BF16_MATMUL_ADVANTAGE:g}x")


def _cpu_model() -> str:
    """The host CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.
    Only process 0 writes; other processes get a writer that does nothing."""

    def __init__(self, jsonl_path: Path, tb_dir: Path | None = None):
        self.active = jax.process_index() == 0
        self.jsonl_path = jsonl_path
        self.tb = None
        if self.active and tb_dir is not None:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StartupClock:
    """Time from its creation to the first train step, and the XLA compilations meanwhile: how many, their
    seconds, and how many came from the persistent compilation cache. Listens to JAX's monitoring events
    while open (a context manager)."""

    def __init__(self):
        self.start = time.time()
        self.programs = self.cache_hits = 0
        self.compile_s = 0.0

    def _on_duration(self, event: str, seconds: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            self.programs += 1
            self.compile_s += seconds

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self) -> "StartupClock":
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def first_step(self) -> dict:
        """The figures for a first step that has just finished, as metrics.jsonl records them."""
        return {"first_step_s": time.time() - self.start, "compile_s": self.compile_s,
                "programs_compiled": self.programs, "compile_cache_hits": self.cache_hits}


def describe_first_step(record: dict) -> str:
    """The console line for `StartupClock.first_step()`'s figures."""
    return (f"first step after {record['first_step_s']:.1f}s (compile {record['compile_s']:.1f}s: "
            f"{record['programs_compiled']} programs, {record['compile_cache_hits']} from the compile cache)")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """Saves train and validation loss against step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)
