"""Compile time of the jitted train step against depth, unrolled vs scanned layers (`model.scan_layers`).

    nice -n 5 .venv/bin/python tools/bench/compile_time.py [--layers 4 32] [--d-model 128] [--remat nothing]
        [--repeats 1]

Each case (layers x {unrolled, scanned}) runs in a fresh process with JAX's persistent compilation cache off, and
times `jax.jit(train_step).lower(state, batch)` (tracing) and `.compile()` (XLA) of the step exactly as the
training loop builds it (AdamW, clipping, state donated), from abstract shapes (nothing is allocated or run).
Prints one JSON line per case, then a JSON summary with the median lower + compile seconds per case and, per
layout, the ratio of the deepest model's time to the shallowest's (issue 17's target for scanned layers: <= 1.5
for 32 vs 4 layers). With --repeats, the cases run in rounds so a change in the host's load hits them alike.
"""

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time


def measure(layers: int, scan: bool, d_model: int, remat: str, seq_len: int, batch: int) -> dict:
    """Lower and compile seconds of one case's train step (in this process, which must not have compiled it)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from lmjax.config import base_config, validate
    from lmjax.model.params import abstract_model
    from lmjax.train.optim import make_optimizer
    from lmjax.train.step import init_state, train_step

    cfg = base_config()
    cfg.model.update(family="llama", num_layers=layers, d_model=d_model, num_heads=max(d_model // 64, 1),
                     d_ff=3 * d_model, seq_len=seq_len, vocab_size=256, dtype="float32", remat=remat,
                     scan_layers=scan)
    validate(cfg)
    tx = make_optimizer(cfg.train)
    graphdef, _, _ = abstract_model(cfg.model)
    state = jax.eval_shape(functools.partial(init_state, cfg.model, tx, 0))
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len), jax.numpy.int32)
    batch_shapes = {k: tokens for k in ("inputs", "targets", "segment_ids", "positions")}
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False), donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(state, batch_shapes)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"layers": layers, "scan_layers": scan, "lower_s": round(lowered_at - start, 3),
            "compile_s": round(done - lowered_at, 3), "total_s": round(done - start, 3)}


def run_case(args: argparse.Namespace, layers: int, scan: bool) -> dict:
    """`measure` in a fresh Python process."""
    cmd = [sys.executable, __file__, "--one", str(layers), str(int(scan)), "--d-model", str(args.d_model),
           "--remat", args.remat, "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--remat", default="nothing", choices=("nothing", "dots", "full"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", nargs=2, type=int, metavar=("LAYERS", "SCAN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], bool(args.one[1]), args.d_model, args.remat, args.seq_len, args.batch)))
        return
    cases = [(layers, scan) for scan in (False, True) for layers in args.layers]
    totals: dict[tuple[int, bool], list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for layers, scan in cases:
            result = run_case(args, layers, scan)
            print(json.dumps(result), flush=True)
            totals[(layers, scan)].append(result["total_s"])
    median = {case: round(statistics.median(times), 3) for case, times in totals.items()}
    shallow, deep = min(args.layers), max(args.layers)
    summary = {
        "d_model": args.d_model, "seq_len": args.seq_len, "batch": args.batch, "remat": args.remat,
        "repeats": args.repeats,
        "median_total_s": {f"{'scanned' if scan else 'unrolled'}_{layers}": t for (layers, scan), t in median.items()},
        f"ratio_{deep}_over_{shallow}": {("scanned" if scan else "unrolled"): round(
            median[(deep, scan)] / median[(shallow, scan)], 2) for scan in (False, True)},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
