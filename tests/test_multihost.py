"""Multi-process training: joining a job, data loaders that do not depend on the process count, and
checkpoints that resume on a different number of processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_OVERRIDES

from lmjax.config import ConfigError, base_config
from lmjax.input.loaders import Loaders, loader_count
from lmjax.input.packing import train_iterator
from lmjax.parallel.distributed import ClusterSpec, cluster_spec, detect_cluster, initialize
from lmjax.run.checkpoint import Checkpointer, CheckpointError

LMJAX = [sys.executable, "-m", "lmjax.cli", "train"]
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
# A constant learning rate after a warm-up shorter than every run: the schedule must not depend on
# train.steps, which grows between resumes.
RUN = ["train.log_every=1", "train.eval_every=0", "train.ckpt_every=100", "train.samples=", "train.decay=constant",
       "train.warmup_steps=2", "distributed.timeout_s=60"]


def _distributed(**values) -> object:
    d = base_config().distributed
    d.update(values)
    return d


def _no_cluster():
    return "", 1


def test_plain_run_stays_single_process():
    assert cluster_spec(_distributed(), environ={}, detect=_no_cluster) is None
    assert cluster_spec(_distributed(num_processes=1), environ={}, detect=_no_cluster) is None
    assert cluster_spec(_distributed(), environ={}, detect=lambda: ("slurm", 1)) is None


def test_cluster_spec_from_config_env_and_detection():
    full = _distributed(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert cluster_spec(full, environ={}, detect=_no_cluster) == ClusterSpec("10.0.0.1:1234", 4, 3, "config")
    env = {"JAX_COORDINATOR_ADDRESS": "head:99"}
    from_env = cluster_spec(_distributed(num_processes=2, process_id=0), environ=env, detect=_no_cluster)
    assert from_env == ClusterSpec("head:99", 2, 0, "config")
    slurm = lambda: ("slurm", 4)
    assert cluster_spec(_distributed(), environ={}, detect=slurm) == ClusterSpec(None, None, None, "slurm")
    assert cluster_spec(_distributed(process_id=1), environ={}, detect=slurm).process_id == 1


@pytest.mark.parametrize("values, message", [
    (dict(coordinator_address="10.0.0.1"), "host:port"),
    (dict(coordinator_address="10.0.0.1:http"), "host:port"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"process_id \(2\) must be smaller than"),
    (dict(num_processes=-1), "num_processes must be >= 0"),
    (dict(num_processes=2), "set distributed.coordinator_address, distributed.process_id"),
    (dict(coordinator_address="h:1"), "set distributed.num_processes, distributed.process_id"),
])
def test_inconsistent_distributed_settings_fail(values, message):
    with pytest.raises(ConfigError, match=message):
        cluster_spec(_distributed(**values), environ={}, detect=_no_cluster)


def test_initialize_checks_before_touching_jax(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    jax.devices()
    assert initialize(base_config()) is None  # no cluster: a no-op, even after JAX started
    bad = base_config()
    bad.distributed.update(coordinator_address="127.0.0.1:1", num_processes=2, process_id=5)
    with pytest.raises(ConfigError, match="process_id"):
        initialize(bad)
    bad.distributed.update(process_id=0)
    with pytest.raises(ConfigError, match="already in use before joining"):
        initialize(bad)
    cpus = base_config()
    cpus.distributed.local_cpu_devices = len(jax.devices("cpu")) + 1
    with pytest.raises(ConfigError, match="cannot apply"):
        initialize(cpus)


def test_slurm_job_is_detected(monkeypatch):
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
                       "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    assert detect_cluster() == ("slurm", 4)
    assert cluster_spec(_distributed()).source == "slurm"


def test_loader_count_checks():
    assert loader_count(0, 2, 8, 1) == 2 and loader_count(4, 2, 8, 2) == 4
    with pytest.raises(ConfigError, match=r"data.loaders \(3\) must be a multiple of the number of processes \(2\)"):
        loader_count(3, 2, 12, 1)
    with pytest.raises(ConfigError, match=r"train.batch_size \(8\) must be divisible by data.loaders \(4\)"):
        loader_count(4, 1, 8, 4)


def _synthetic_loaders(count: int, process_index: int = 0, process_count: int = 1, micro: int = 2) -> Loaders:
    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, 50, rng.integers(4, 17)).astype(np.int32) for _ in range(64)]
    make = lambda k, n, rows: train_iterator(chunks, 16, rows, 0, k, n)
    return Loaders(make, count, 8, micro, process_index, process_count)


def test_loaders_give_the_same_global_batches_for_any_process_count():
    one = _synthetic_loaders(2)
    halves = [_synthetic_loaders(2, p, 2) for p in range(2)]
    for _ in range(3):
        whole = next(one)["inputs"].reshape(2, 4, 16)  # [micro-batch, rows, seq_len]
        parts = [next(h)["inputs"].reshape(2, 2, 16) for h in halves]
        np.testing.assert_array_equal(whole, np.concatenate(parts, axis=1))


def test_loader_states_restore_on_another_process_count():
    one = _synthetic_loaders(2)
    next(one)
    saved = json.loads(json.dumps(one.state()))
    expected = next(one)["inputs"].reshape(2, 4, 16)[:, 2:]
    second = _synthetic_loaders(2, 1, 2)
    second.restore(saved)
    np.testing.assert_array_equal(next(second)["inputs"].reshape(2, 2, 16), expected)


def test_checkpoint_with_other_loader_count_fails_clearly(tmp_path):
    state = {"params": {"w": jnp.ones(3)}, "step": jnp.int32(5), "opt_state": {"mu": jnp.zeros(3)},
             "rng": jnp.zeros(2, jnp.uint32)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(state, _synthetic_loaders(2))
    ckpt.manager.wait_until_finished()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    with pytest.raises(ConfigError, match="written with 2 data loaders but data.loaders is 4"):
        ckpt.restore(abstract, _synthetic_loaders(4, micro=1))
    assert int(ckpt.restore(abstract, _synthetic_loaders(2))["step"]) == 5
    ckpt.save({**state, "step": jnp.int32(6)})  # like a checkpoint of an older lmjax: no loader positions
    ckpt.manager.wait_until_finished()
    with pytest.raises(CheckpointError, match="step 6 .* holds no data loader positions.*init_from"):
        ckpt.restore(abstract, _synthetic_loaders(2))
    assert ckpt.restore_params(abstract["params"], step=6)["w"].shape == (3,)
    ckpt.close()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    return dict(env, JAX_PLATFORMS="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir, overrides: list[str], processes: int = 1, fresh: bool = True) -> None:
    """Runs `lmjax train` as `processes` processes of one job on this machine (8 CPU devices in all)."""
    config = ["--config", "configs/tiny.py", *[f"--config.{o}" for o in TINY_OVERRIDES + RUN]] if fresh else []
    port = _free_port()
    procs = []
    for i in range(processes):
        join = ([f"distributed.coordinator_address=127.0.0.1:{port}", f"distributed.num_processes={processes}",
                 f"distributed.process_id={i}"] if processes > 1 else [])
        args = [f"--config.{o}" for o in overrides + join + [f"distributed.local_cpu_devices={8 // processes}"]]
        procs.append(subprocess.Popen([*LMJAX, *config, *args, "--workdir", str(workdir)], env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


def _losses(workdir) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
    """A 2-process run (one loader each) stopped after 3 steps, resumed by 2 processes to step 6 and then
    by 1 process to step 9, matches a 1-process run with 2 loaders step for step."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    _train(single, MESH + ["data.loaders=2", "train.steps=9"])
    _train(multi, MESH + ["train.steps=3"], processes=2)
    assert json.loads((multi / "config.json").read_text())["data"]["loaders"] == 2
    _train(multi, MESH + ["train.steps=6"], processes=2)
    _train(multi, ["train.steps=9"], processes=1, fresh=False)  # from config.json: 2 loaders, same mesh
    assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6, 9]
    # Same program on the same mesh; only the collectives between processes (gloo) may sum in another
    # order than within one process: float32 differences of a few ulps (~1e-6 on a loss near 6) per step.
    assert _losses(multi) == pytest.approx(_losses(single), abs=1e-4)
    assert len(_losses(single)) == 9


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """A preemption notice (SIGTERM) reaching one host: both processes checkpoint after the same step and
    exit cleanly, and the run resumes from that checkpoint."""
    workdir, port = tmp_path / "run", _free_port()
    config = ["--config", "configs/tiny.py", *[f"--config.{o}" for o in TINY_OVERRIDES + RUN + MESH]]
    procs = []
    for i in range(2):
        join = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                f"distributed.process_id={i}", "distributed.local_cpu_devices=4", "train.steps=10000"]
        procs.append(subprocess.Popen([*LMJAX, *config, *[f"--config.{o}" for o in join], "--workdir", str(workdir)],
                                      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 180
        while not (workdir / "metrics.jsonl").is_file() or len(_losses(workdir)) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 2 <= steps[0] < 10000, steps
    assert f"SIGTERM: checkpoint saved at step {steps[0]}" in outputs[0]
    _train(workdir, [f"train.steps={steps[0] + 2}"], processes=2, fresh=False)
    assert len(_losses(workdir)) == steps[0] + 2


def test_two_process_dpo_matches_one_process(trained_run, tmp_path):
    """DPO (pairs per loader, a frozen reference restored onto the sharded mesh) on 2 processes gives the
    losses of 1 process with the same 2 loaders."""
    pairs = [{"prompt": [{"role": "user", "content": f"What is item {i}?"}],
              "chosen": f"Item {i} is {'very ' * (i % 7)}good.", "rejected": "No." * (1 + i % 3)} for i in range(40)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    dpo = MESH + ["train.objective=dpo", "train.steps=4", "train.lr=1e-3", f"init_from={trained_run[0]}",
                  f"data.train=pairs:{data}", "data.val="]
    _train(tmp_path / "single", dpo + ["data.loaders=2"])
    _train(tmp_path / "multi", dpo, processes=2)
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(tmp_path / "single"), abs=1e-4)
    assert len(_losses(tmp_path / "single")) == 4
