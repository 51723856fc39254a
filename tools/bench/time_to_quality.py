"""Time to quality: how long each training change takes to reach a fixed validation bits/byte on this machine.

    .venv/bin/python tools/bench/time_to_quality.py --config configs/tiny.py --steps 200 --eval-every 25 \
        [--variant NAME=KEY=VALUE,KEY=VALUE ...] [--only NAME ...] [--repeats 1]

Every variant trains `--config` from scratch for `--steps` steps in its own `lmjax train` process (start-up and
compile included, the data already tokenized into a shared cache by a warm-up run), evaluating every
`--eval-every` steps. The target is the first variant's ("base") final val bits/byte; each variant's time to
target is the process time at its first evaluation at or below it (start-up + the loop's elapsed time at that
step). Prints one JSON line per run and a table; with --repeats, variants run in rounds (base, a, b, ...,
base, a, b, ...) so a change in the host's load hits them alike.
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
    evals = [(startup + r["elapsed_s"], r["val_bpb"]) for r in records if "val_bpb" in r]
    rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    return {"wall_s": round(wall, 1), "startup_s": round(startup, 1), "final_bpb": round(evals[-1][1], 4),
            "evals": [(round(t, 1), round(b, 4)) for t, b in evals],
            "tokens_per_s": round(sorted(rates)[len(rates) // 2]) if rates else None}


def time_to(evals: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, bpb in evals if bpb <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,KEY=VALUE (adds or replaces)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (base is always run)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--common", default="", help="KEY=VALUE,... applied to every variant")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    if args.only:
        variants = {k: v for k, v in variants.items() if k == "base" or k in args.only}
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
    target = min(r["final_bpb"] for r in results["base"])
    print(f"\ntarget: val bpb {target:.4f} (base's final); {args.config}, {args.steps} steps, eval every "
          f"{args.eval_every}; load average {os.getloadavg()[0]:.1f}")
    print("| variant | final bpb | time to target (s) | vs base | wall (s) | start-up (s) | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_time = min(t for r in results["base"] if (t := time_to(r["evals"], target)) is not None)
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["final_bpb"])
        times = [t for r in runs if (t := time_to(r["evals"], target)) is not None]
        reached = f"{min(times):.0f}" if times else "not reached"
        ratio = f"{min(times) / base_time:.2f}x" if times else "-"
        print(f"| {name} | {best['final_bpb']:.4f} | {reached} | {ratio} | {min(r['wall_s'] for r in runs):.0f} | "
              f"{min(r['startup_s'] for r in runs):.0f} | {best['tokens_per_s']} |")


if __name__ == "__main__":
    main()
