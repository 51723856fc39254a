"""Adversarial training cost: the train step of each `train.adversarial` method against the plain step, in the same
process (target: at most (K + 1)x a plain step for K ascent steps; "met" allows 5% for timing noise).

The step is lmjax's jitted `train_step` on a random batch of the `tiny` config's shapes (the quickstart's model: 4
layers, d256, 256 tokens, batch 16, bfloat16 compute). Methods are timed in interleaved rounds (every method once per
round) so that a slower stretch of the machine hits them all alike; each figure is the median over rounds.

    .venv/bin/python tools/bench/adversarial_cost.py                 # 5 rounds of 5 steps
    .venv/bin/python tools/bench/adversarial_cost.py --rounds 3 --steps 3 --dtype float32
    .venv/bin/python tools/bench/adversarial_cost.py --json costs.json   # ratios for experiments/robustness.py
"""

import argparse
import functools
import json
import statistics
import time

import jax
import numpy as np

from lmjax.config import apply_overrides, load_config
from lmjax.model.params import abstract_model
from lmjax.train.adversarial import AdversarialSpec
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_state, train_step

NOISE = 1.05  # timing noise allowed when comparing against the target
METHODS = {  # name -> (spec, ascent steps K)
    "plain": (AdversarialSpec(), 0),
    "neftune": (AdversarialSpec("neftune", alpha=5.0), 0),
    "pgd K=1": (AdversarialSpec("pgd", steps=1), 1),
    "pgd K=3": (AdversarialSpec("pgd", steps=3), 3),
    "pgd K=1 w=0.5": (AdversarialSpec("pgd", steps=1, weight=0.5), 1),
    "freelb K=2": (AdversarialSpec("freelb", steps=2, init="random"), 2),
    "freelb K=3": (AdversarialSpec("freelb", steps=3, init="random"), 3),
    "smart K=1": (AdversarialSpec("smart", steps=1), 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per method per round")
    parser.add_argument("--dtype", default="bfloat16", help="model.dtype")
    parser.add_argument("--json", default=None, help="also write {method: cost in plain steps} to this file")
    args = parser.parse_args()
    cfg = apply_overrides(load_config("configs/tiny.py"), [f"model.dtype={args.dtype}", "model.vocab_size=4096"])
    graphdef, _, _ = abstract_model(cfg.model)
    tx = make_optimizer(cfg.train)
    state = init_state(cfg.model, tx, 0)
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.model.seq_len
    tokens = rng.integers(0, 4096, (1, b, t + 1)).astype(np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": np.ones((1, b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy()}
    steps = {}
    for name, (spec, _) in METHODS.items():
        steps[name] = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False,
                                                adversarial=spec))
        jax.block_until_ready(steps[name](state, batch))  # compile
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                out = step(state, batch)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.steps)
    plain = statistics.median(times["plain"])
    print(f"tiny shapes ({cfg.model.num_layers} layers, d{cfg.model.d_model}, {t} tokens x {b}), {args.dtype}, "
          f"{jax.devices()[0].device_kind}; median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'method':<16}{'ms/step':>9}{'x plain':>9}{'target':>8}  met")
    ratios = {}
    for name, (_, k) in METHODS.items():
        ms = statistics.median(times[name])
        ratios[name], target = ms / plain, k + 1
        print(f"{name:<16}{1000 * ms:>9.1f}{ratios[name]:>9.2f}{f'<= {target}':>8}  "
              f"{'yes' if ratios[name] <= NOISE * target else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ratios, f, indent=1)


if __name__ == "__main__":
    main()
