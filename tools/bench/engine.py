"""Continuous-batching engine, in process: decode tokens/s against the number of active requests, and batch
invariance on this backend.

For each `--slots` pool size the engine is warmed up, then `active` requests (1, and up to the pool size)
decode together for `--steps` steps with no early stop; the figure is output tokens/s of `Engine.step` (the
jitted decode step plus the host work around it: per-row settings, the token read-back, bookkeeping). It
then checks that a seeded, sampled request gives the same tokens alone and among `slots - 1` others. Random
weights of `--config`'s model (default `configs/tiny.py`), float32 unless `--dtype` says otherwise.

    .venv/bin/python tools/bench/engine.py                                   # tiny, 16 and 64 slots
    python3 tools/bench/engine.py --config configs/gpt2_small.py --slots 1 16 64 --dtype bfloat16   # a GPU
"""

import argparse
import time

import jax
import numpy as np

from lmjax.config import load_config
from lmjax.infer.engine import Engine
from lmjax.model.params import abstract_model, init_params


def tokens_per_second(engine: Engine, active: int, prompt_len: int, steps: int) -> float:
    """Output tokens/s of `active` requests decoding together (after two steps to admit them)."""
    rng = np.random.default_rng(0)
    ids = [engine.submit(rng.integers(5, engine.cfg.vocab_size, prompt_len).tolist(), max_tokens=10**6,
                         temperature=1.0, seed=i) for i in range(active)]
    engine.step()
    engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    for request in ids:
        engine.cancel(request)
    engine.step()
    return active * steps / elapsed


def invariant(engine: Engine, prompt_len: int) -> bool:
    """Whether a seeded, sampled request gets the same tokens alone and among `num_slots - 1` others."""
    rng = np.random.default_rng(1)
    target = {"prompt_ids": rng.integers(5, engine.cfg.vocab_size, prompt_len).tolist(), "max_tokens": 32,
              "temperature": 0.9, "top_p": 0.95, "seed": 11}
    others = [{"prompt_ids": rng.integers(5, engine.cfg.vocab_size, 1 + i % prompt_len).tolist(),
               "max_tokens": 8 + i % 40, "temperature": 0.7 * (i % 3), "seed": i} for i in range(engine.num_slots - 1)]
    alone = engine.generate_all([target])[0]
    mixed = engine.generate_all(others[: len(others) // 2] + [target] + others[len(others) // 2:])
    return mixed[len(others) // 2] == alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.py", help="config whose model to build (random weights)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 64], help="engine pool sizes")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=50, help="timed decode steps per figure")
    args = parser.parse_args()
    cfg = load_config(args.config).model
    cfg.update(vocab_size=args.vocab, dtype=args.dtype)
    graphdef, _, _ = abstract_model(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); model {cfg.family} d{cfg.d_model} x "
          f"{cfg.num_layers} layers, context {cfg.seq_len}, vocab {args.vocab}, {args.dtype}")
    print(f"{'slots':>6} {'active':>7} {'ms/step':>9} {'tokens/s':>10} {'x batch-1':>10}")
    for slots in args.slots:
        engine = Engine(cfg, graphdef, params, num_slots=slots)
        start = time.perf_counter()
        engine.warmup()
        warmup = time.perf_counter() - start
        base = None
        for active in sorted({1, max(1, slots // 4), slots}):
            rate = tokens_per_second(engine, active, args.prompt_len, args.steps)
            base = base or rate
            print(f"{slots:>6} {active:>7} {1e3 * active / rate:>9.2f} {rate:>10.0f} {rate / base:>10.1f}", flush=True)
        print(f"{slots:>6} warmup {warmup:.1f} s; seeded request alone == among {slots - 1} others: "
              f"{invariant(engine, args.prompt_len)}", flush=True)


if __name__ == "__main__":
    main()
