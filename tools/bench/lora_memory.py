"""LoRA memory: peak memory of a LoRA fine-tune of `gpt2_small`-shaped weights against the full fine-tune, in the
same run (target: LoRA at most 40% of the full fine-tune's peak).

Each variant runs in a process of its own (so that one's high-water mark cannot hide the other's): it makes
random weights of configs/gpt2_small.py (124M parameters with the GPT-2 vocabulary), leaf by leaf in the dtype
they are held in, builds the train state (full: params + AdamW state; LoRA: adapters + their AdamW state, the
frozen base apart) and runs `--steps` jitted train steps (lmjax/train/step.py) on a random batch. It reports
- the peak resident memory of the process (`ru_maxrss`), and that peak less the same process's resident
  memory just before the weights were made (JAX's runtime and the imported libraries: the same for every
  variant), and
- XLA's compiled memory analysis of the step: arguments + outputs - donated (aliased) buffers + temporaries,
  which is what the step needs at its peak on any device.

    .venv/bin/python tools/bench/lora_memory.py                         # batch 1 x 1024 tokens, rank 8
    .venv/bin/python tools/bench/lora_memory.py --batch 2 --seq-len 512 --remat full --steps 2
"""

import argparse
import functools
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import apply_overrides, load_config
from lmjax.model.lora import LoraSpec, frozen_base
from lmjax.model.params import abstract_model, count_params
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_lora_state, lora_train_step, start_state, train_step

TARGET = 0.40
VARIANTS = {"full": "", "lora": "", "lora-bf16": "bfloat16", "lora-int8": "int8"}  # name -> LoRA base dtype


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def random_weights(cfg, base_dtype: str) -> dict:
    """Random parameters in the layout of `cfg.model`, made one leaf at a time and held as LoRA holds its frozen
    base (`frozen_base`), so no full float32 copy ever exists when the base is bfloat16 or int8."""
    _, shapes, _ = abstract_model(cfg.model)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.PRNGKey(0)
    leaves = []
    for i, (path, shape) in enumerate(flat):
        w = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape.shape, shape.dtype)
        single = {path[-1].key: w}  # frozen_base decides by the parameter's name
        leaves.append(jax.block_until_ready(frozen_base(single, base_dtype)[path[-1].key]))
    return jax.tree_util.tree_unflatten(tree, leaves)


def memory_analysis(compiled) -> int:
    """Peak bytes of a compiled step by XLA's analysis: arguments + outputs - aliased (donated) + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def child(args) -> None:
    """One variant: prints a JSON line with its figures."""
    cfg = apply_overrides(load_config("configs/gpt2_small.py"),
                          [f"model.seq_len={args.seq_len}", f"model.remat={args.remat}",
                           f"train.batch_size={args.batch}", f"train.lora.rank={args.rank}",
                           f"train.lora.base_dtype={VARIANTS[args.child]}"])
    lora = LoraSpec.from_config(cfg.train.lora)
    graphdef, shapes, _ = abstract_model(cfg.model)
    tx = make_optimizer(cfg.train)
    floor = rss_bytes()
    params = random_weights(cfg, lora.base_dtype if args.child != "full" else "")
    if args.child == "full":
        state = jax.jit(functools.partial(start_state, tx=tx, seed=0), donate_argnums=0)(params)
        step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False), donate_argnums=0)
        call = lambda s, b: step(s, b)
        compiled = step.lower(state, batch_of(args)).compile()
        trained = count_params(state["params"])
    else:
        state = jax.jit(functools.partial(init_lora_state, shapes, lora, "gpt2", tx, 0))()
        step = jax.jit(functools.partial(lora_train_step, graphdef=graphdef, tx=tx, dropout=False, lora=lora),
                       donate_argnums=0)
        call = lambda s, b: step(s, params, b)
        compiled = step.lower(state, params, batch_of(args)).compile()
        trained = count_params(state["params"])
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = call(state, batch_of(args))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": args.child, "trainable": trained, "peak_rss": peak, "floor_rss": floor,
                      "xla_peak": memory_analysis(compiled), "step_s": float(np.median(times[1:] or times)),
                      "loss": float(metrics["loss"])}))


def batch_of(args) -> dict:
    tokens = np.random.default_rng(0).integers(0, 50257, size=(1, args.batch, args.seq_len + 1))
    return {"inputs": jnp.asarray(tokens[..., :-1], jnp.int32), "targets": jnp.asarray(tokens[..., 1:], jnp.int32),
            "segment_ids": jnp.ones((1, args.batch, args.seq_len), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), (1, args.batch, args.seq_len))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (all projections adapted)")
    parser.add_argument("--remat", default="nothing", choices=("nothing", "dots", "full"), help="model.remat")
    parser.add_argument("--steps", type=int, default=3, help="train steps per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANTS))
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"gpt2_small shapes, batch {args.batch} x {args.seq_len} tokens, remat={args.remat}, LoRA rank {args.rank} "
          f"on every projection, {args.steps} steps; {jax.device_count()} {jax.default_backend()} device(s)")
    rows = {}
    for name in args.variants.split(","):
        argv = [sys.executable, __file__, "--child", name] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                                vars(args).items() if k not in ("child", "variants")]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    full = rows.get("full")
    print(f"{'variant':10} {'trainable':>12} {'peak RSS':>10} {'RSS - floor':>12} {'XLA step peak':>14} {'s/step':>7} "
          f"{'ratio (RSS-floor, XLA)':>24}")
    for name, r in rows.items():
        ratio = ""
        if full:
            ratio = (f"{(r['peak_rss'] - r['floor_rss']) / (full['peak_rss'] - full['floor_rss']):.0%}, "
                     f"{r['xla_peak'] / full['xla_peak']:.0%}")
        print(f"{name:10} {r['trainable']:>12,} {r['peak_rss'] * mb:>8.0f}MB "
              f"{(r['peak_rss'] - r['floor_rss']) * mb:>10.0f}MB {r['xla_peak'] * mb:>12.0f}MB {r['step_s']:>7.2f} "
              f"{ratio:>24}")
    print(f"target: LoRA peak <= {TARGET:.0%} of the full fine-tune's (runtime floor {full['floor_rss'] * mb:.0f}MB "
          "of every process excluded in the RSS ratio)" if full else "")


if __name__ == "__main__":
    main()
