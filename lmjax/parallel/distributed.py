"""Joining a multi-process (multi-host) JAX job, from the `distributed.*` knobs.

`initialize(cfg)` runs before anything else touches JAX. It calls `jax.distributed.initialize` when
the config names a cluster (`coordinator_address`, `num_processes`, `process_id`), when
$JAX_COORDINATOR_ADDRESS is set, or when JAX recognises the environment as a multi-process SLURM,
Open MPI or Cloud TPU job (JAX then finds the coordinator, process count and id itself). Otherwise the
run stays a single process and nothing is initialised, so a laptop run never waits for peers.
"""

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from lmjax.config import ConfigError

AUTO_DETECTED = ("slurm", "ompi", "gcetpu", "gketpu")  # JAX cluster environments trusted to start a job


class ClusterSpec(NamedTuple):
    """Arguments of `jax.distributed.initialize`; None = JAX detects it from the cluster environment."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str  # "config" or the name of the detected cluster environment


def detect_cluster() -> tuple[str, int]:
    """(name, process count) of the cluster environment JAX would configure itself from, or ("", 1).

    Uses JAX's own detectors (jax._src.clusters), limited to `AUTO_DETECTED`."""
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if env.name in AUTO_DETECTED and env.is_env_present():
            return env.name, env.get_process_count()
    return "", 1


def cluster_spec(d: ConfigDict, environ: Mapping[str, str] = os.environ,
                 detect: Callable[[], tuple[str, int]] = detect_cluster) -> ClusterSpec | None:
    """How this process joins a job, or None for a single process; ConfigError if the knobs disagree."""
    address = d.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"distributed.coordinator_address must look like host:port, got {address!r}")
    if d.num_processes < 0:
        raise ConfigError(f"distributed.num_processes must be >= 0 (0 = auto-detect), got {d.num_processes}")
    if d.process_id < -1:
        raise ConfigError(f"distributed.process_id must be >= 0 (-1 = auto-detect), got {d.process_id}")
    if d.num_processes and d.process_id >= d.num_processes:
        raise ConfigError(f"distributed.process_id ({d.process_id}) must be smaller than "
                          f"distributed.num_processes ({d.num_processes})")
    if d.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be positive, got {d.timeout_s}")
    if address and d.num_processes and d.process_id >= 0:
        return ClusterSpec(address, d.num_processes, d.process_id, "config")
    if not address and d.num_processes == 1 and d.process_id in (-1, 0):
        return None
    explicit = bool(address) or d.num_processes > 0 or d.process_id >= 0
    cluster, count = detect()
    if cluster:
        if not explicit and count <= 1:
            return None
        return ClusterSpec(address or None, d.num_processes or None,
                           None if d.process_id < 0 else d.process_id, cluster)
    if not explicit:
        return None
    missing = [name for name, unset in (("coordinator_address", not address),
                                        ("num_processes", not d.num_processes),
                                        ("process_id", d.process_id < 0)) if unset]
    raise ConfigError(f"distributed: no SLURM, Open MPI or Cloud TPU environment to detect the job from, so "
                      f"set {', '.join('distributed.' + m for m in missing)} as well (or none of them)")


def initialize(cfg: ConfigDict) -> None:
    """Sets the CPU device count and joins the job described by `cfg.distributed` (see the module
    docstring); a no-op for a single process or when already initialised. Logs one line on process 0."""
    d = cfg.distributed
    if d.local_cpu_devices < 0:
        raise ConfigError(f"distributed.local_cpu_devices must be >= 0, got {d.local_cpu_devices}")
    spec = cluster_spec(d)
    if jax.distributed.is_initialized():
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if spec is not None:
            raise ConfigError("distributed: JAX was already in use before joining the job; call "
                              "lmjax.parallel.distributed.initialize(cfg) first")
        if d.local_cpu_devices and len(jax.devices("cpu")) != d.local_cpu_devices:
            raise ConfigError(f"distributed.local_cpu_devices={d.local_cpu_devices} cannot apply: JAX is already "
                              f"running with {len(jax.devices('cpu'))} CPU devices")
        return
    if d.local_cpu_devices:
        jax.config.update("jax_num_cpu_devices", d.local_cpu_devices)
    if spec is None:
        return
    jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id,
                               initialization_timeout=d.timeout_s)
    if jax.process_index() == 0:
        print(f"distributed: {jax.process_count()} processes joined ({spec.source}) with "
              f"{jax.device_count()} devices, {jax.local_device_count()} per process", flush=True)


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(len(data)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes, strict=True)]


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
