"""Data-parallel scaling on this machine: the `tiny` train step on 2 CPU devices (one per core) vs 1.

Each case runs in its own process (the number of CPU devices is fixed when JAX starts), builds the mesh
and shardings exactly as the training loop does, and times the jitted, donated train step on a random
batch of the configured global size:

    1 device, 1 thread      XLA's CPU thread pool off: one core does everything
    2 devices, 1 thread each  mesh.data=2, each device pinned to one core: the "one device per core" case
    1 device, all threads   the default: XLA parallelises each op over both cores
    2 devices, all threads  mesh.data=2 with the default thread pools (cores shared)

    .venv/bin/python tools/bench/scaling.py [--config configs/tiny.py] [--steps 20] [--batch 16]
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
CASES = [  # (label, devices, extra XLA flags)
    ("1 device, 1 thread", 1, SINGLE_THREAD),
    ("2 devices, 1 thread each", 2, SINGLE_THREAD),
    ("1 device, all threads", 1, ""),
    ("2 devices, all threads", 2, ""),
]


def worker(args: argparse.Namespace) -> dict:
    """Tokens/s of the sharded train step on all devices of this process (data parallel)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from lmjax.config import apply_overrides, load_config
    from lmjax.model.params import abstract_model
    from lmjax.parallel.mesh import make_mesh
    from lmjax.parallel.rules import logical_to_spec, tree_shardings, use_rules
    from lmjax.train.optim import make_optimizer
    from lmjax.train.step import init_state, train_step

    cfg = apply_overrides(load_config(args.config), [f"train.batch_size={args.batch}", "model.vocab_size=4096",
                                                     "mesh.data=-1"])
    m, rules = cfg.model, dict(cfg.mesh.rules)
    mesh = make_mesh(cfg.mesh)
    graphdef, _, axes = abstract_model(m)
    tx = make_optimizer(cfg.train)
    init = functools.partial(init_state, m, tx, 0)
    state_sharding = tree_shardings(mesh, rules, jax.eval_shape(init), axes)
    batch_sharding = NamedSharding(mesh, logical_to_spec((None, "batch", "length"), rules, mesh.shape))
    rng = np.random.default_rng(0)
    shape = (1, args.batch, m.seq_len)
    tokens = rng.integers(0, m.vocab_size, (1, args.batch, m.seq_len + 1), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(m.seq_len, dtype=np.int32), shape).copy()}
    batch = jax.device_put(batch, batch_sharding)
    with use_rules(mesh, rules):
        state = jax.jit(init, out_shardings=state_sharding)()
        step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False),
                       in_shardings=(state_sharding, batch_sharding), donate_argnums=0)
        for _ in range(3):  # compile and warm up
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
    return {"devices": jax.device_count(), "step_s": float(np.median(times)),
            "tokens_per_s": args.batch * m.seq_len / float(np.median(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py", help="model config")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    results = {}
    for label, devices, flags in CASES:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {flags}".strip())
        proc = subprocess.run([sys.executable, __file__, "--worker", "--config", args.config, "--steps",
                               str(args.steps), "--batch", str(args.batch)], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        results[label] = json.loads(line.removeprefix("RESULT "))
        print(f"{label:<26} {results[label]['tokens_per_s']:>9,.0f} tok/s  "
              f"({1000 * results[label]['step_s']:.0f} ms/step)", flush=True)
    tps = {label: r["tokens_per_s"] for label, r in results.items()}
    print(f"speed-up, one device per core (2 devices / 1 device, 1 thread each): "
          f"{tps['2 devices, 1 thread each'] / tps['1 device, 1 thread']:.2f}x")
    print(f"speed-up, default threading (2 devices / 1 device):                  "
          f"{tps['2 devices, all threads'] / tps['1 device, all threads']:.2f}x")


if __name__ == "__main__":
    main()
