"""Time to quality: how long each training change takes to reach a fixed validation bits/byte on this machine.

    .venv/bin/python tools/bench/time_to_quality.py --config configs/tiny.py --steps 200 --eval-every 25 \
        [--variant NAME=KEY=VALUE,KEY=VALUE ...] [--only NAME ...] [--repeats 1]

Every variant trains `--config` from scratch for `--steps` steps in its own `lmjax train` process (start-up and
compile included, the data already tokenized into a shared cache by a warm-up run), evaluating every
`--eval-every` steps. The target is the first variant's ("base") final val bits/byte; each variant's time to
target is the process time at its first evaluation at or below it (start-up + the loop's elapsed time at that
step). Training is deterministic, so the steps to target do not depend on the host's load, while the times do:
the table also gives the time to target at the median step time, and `--speed-steps N` measures each variant's
step time in a separate short run (N steps, no evaluation) that can be repeated on a quiet host. Prints one JSON
line per run and a table; with --repeats, variants run in rounds (base, a, b, ..., base, a, b, ...) so a change
in the host's load hits them alike.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The changes of issue 17's ablation, each alone on top of the config (the first is the reference).
VARIANTS = {
    "base": [],
    "float32": ["model.dtype=float32"],
    "muon": ["train.optimizer=muon"],
    "wsd": ["train.decay=wsd"],
    "qk_norm": ["model.qk_norm=True"],
    "relu2": ["model.mlp=relu2"],
    "zero_init_out": ["model.zero_init_out=True"],
    "softcap": ["model.logit_softcap=15.0"],
    "tied": ["model.tie_embeddings=True"],
}


def run_variant(config: str, overrides: list[str], workdir: Path, env: dict) -> dict:
    """One training process; its evaluations as (seconds since process start, val bpb), wall time, tokens/s."""
    cmd = [sys.executable, "-m", "lmjax.cli", "train", "--config", config, "--workdir", str(workdir),
           *(f"--config.{o}" for o in overrides)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    startup = wall - records[-1]["elapsed_s"]  # imports, data, model init and the compile before the loop's clock
    evals = [(r["step"], startup + r["elapsed_s"], r["val_bpb"]) for r in records if "val_bpb" in r]
    steps = [r for r in records if "tokens_per_sec" in r]
    rate = sorted(r["tokens_per_sec"] for r in steps)[len(steps) // 2] if steps else None
    return {"wall_s": round(wall, 1), "startup_s": round(startup, 1),
            "final_bpb": round(evals[-1][2], 4) if evals else None,
            "evals": [(s, round(t, 1), round(b, 4)) for s, t, b in evals], "tokens_per_s": rate and round(rate)}


def steps_to(evals: list, target: float) -> int | None:
    return next((s for s, _, bpb in evals if bpb <= target), None)


def time_to(evals: list, target: float) -> float | None:
    return next((t for _, t, bpb in evals if bpb <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,KEY=VALUE (adds or replaces)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (and base, without --target)")
    parser.add_argument("--target", type=float, default=0.0, help="val bpb to reach (default: base's final)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--common", default="", help="KEY=VALUE,... applied to every variant")
    parser.add_argument("--speed-steps", type=int, default=0, help="also time N steps of each variant alone")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    if args.only:
        variants = {k: v for k, v in variants.items() if (k == "base" and not args.target) or k in args.only}
    tmp = Path(tempfile.mkdtemp(prefix="lmjax-ttq-"))
    env = {**os.environ, "LMJAX_CACHE_DIR": str(tmp / "cache"), "JAX_PLATFORMS": "cpu"}
    common = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", "train.samples=",
              f"train.ckpt_every={args.steps}", *(o for o in args.common.split(",") if o)]
    run_variant(args.config, [*common, "train.steps=1"], tmp / "warmup", env)  # tokenizes the data into the cache
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.repeats):
        for name, overrides in variants.items():
            result = run_variant(args.config, [*common, *overrides], tmp / f"{name}-{round_}", env)
            results[name].append(result)
            print(json.dumps({"variant": name, "round": round_, "overrides": overrides, **result}), flush=True)
    target = args.target or min(r["final_bpb"] for r in results["base"])
    speed = {}
    if args.speed_steps:
        for name, overrides in variants.items():
            quick = [f"train.steps={args.speed_steps}", "train.eval_every=0", "train.eval_steps=1", "train.log_every=1"]
            run = run_variant(args.config, [*common, *overrides, *quick], tmp / f"{name}-speed", env)
            speed[name] = run
            print(json.dumps({"variant": name, "speed_run": True, **run}), flush=True)
    origin = "given" if args.target else "base's final"
    print(f"\ntarget: val bpb {target:.4f} ({origin}); {args.config}, {args.steps} steps, eval every "
          f"{args.eval_every}; load average {os.getloadavg()[0]:.1f}")
    print("| variant | final bpb | steps to target | time to target (s) | at the median step time (s) | start-up (s) | "
          "tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tokens_per_step = _tokens_per_step(args.config, common)
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["final_bpb"])
        steps = steps_to(best["evals"], target)
        times = [t for r in runs if (t := time_to(r["evals"], target)) is not None]
        rate = (speed.get(name) or best)["tokens_per_s"]
        startup = (speed.get(name) or best)["startup_s"]
        at_median = f"{startup + steps * tokens_per_step / rate:.0f}" if steps and rate else "-"
        print(f"| {name} | {best['final_bpb']:.4f} | {steps or 'not reached'} | "
              f"{f'{min(times):.0f}' if times else '-'} | {at_median} | {startup:.0f} | {rate} |")


def _tokens_per_step(config: str, common: list[str]) -> int:
    """train.batch_size x model.seq_len of `config` with the `common` overrides."""
    sys.path.insert(0, str(REPO))
    from lmjax.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(config), common)
    return cfg.train.batch_size * cfg.model.seq_len


if __name__ == "__main__":
    main()
