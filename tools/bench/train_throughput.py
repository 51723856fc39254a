"""Training throughput: tokens/s and MFU of the lmjax train step against Hugging Face GPT-2 (PyTorch).

Each case is one model shape. lmjax runs the jitted `train_step` of lmjax/train/step.py with the
optimizer of lmjax/train/optim.py (clip + AdamW); gpt2-family cases are also trained by
`transformers.GPT2LMHeadModel` with `torch.optim.AdamW` and the same clipping, in float32 and under
bfloat16 autocast. MFU divides model FLOPs/s (`flops_per_token` x tokens/s) by a square-matmul peak
measured in this run in the same dtype.

    .venv/bin/python tools/bench/train_throughput.py                      # llama d256 + gpt2 d512
    .venv/bin/python tools/bench/train_throughput.py --family gpt2 --d-model 768 --layers 2 --breakdown
    .venv/bin/python tools/bench/train_throughput.py --family gpt2 --d-model 512 --matmul-floor  # the step's bound

On a GPU, PyTorch runs on the GPU too (autocast on "cuda", its default SDPA attention), and MFU divides by the
chip's spec-sheet bfloat16 peak (`lmjax.train.metrics.mfu_peak`) instead of a measured one.
"""

import argparse
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# On a GPU, JAX would otherwise take 75% of its memory at start-up and leave PyTorch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from lmjax.config import base_config, validate
from lmjax.model.attention_kernels import attend
from lmjax.model.config import ModelConfig
from lmjax.model.layers import head_logits
from lmjax.model.loss import token_losses
from lmjax.model.params import abstract_model, flops_per_token
from lmjax.train.metrics import measure_matmul_peak, mfu_peak
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_state, train_step


@dataclass
class Result:
    """Per-step times (seconds) of one implementation on one case."""

    name: str
    dtype: str
    step: Callable[[], None]  # one training step, blocking until it is done
    tokens_per_step: int
    times: list[float] = field(default_factory=list)
    compile_s: float = 0.0

    @property
    def step_s(self) -> float:
        return float(np.median(self.times))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_each(results: list[Result], warmup: int, steps: int) -> None:
    """Times each implementation on its own: `warmup` untimed steps (the first compiles), then `steps`
    timed ones. A pause before each lets the other library's idle worker threads (PyTorch's OpenMP pool
    spins for a while after its last op) go to sleep, so they do not steal cores from the next one."""
    for r in results:
        time.sleep(1.0)
        r.compile_s = timed(r.step)
        for _ in range(warmup - 1):
            r.step()
        r.times = [timed(r.step) for _ in range(steps)]


def model_config(args: argparse.Namespace, family: str, d_model: int) -> ConfigDict:
    """The lmjax model config of one case (gpt2 ties its embeddings, as GPT2LMHeadModel does)."""
    cfg = base_config()
    m = cfg.model
    m.family = family
    m.d_model = d_model
    m.num_layers = args.layers
    m.num_heads = args.heads or max(d_model // 64, 1)
    m.d_ff = args.d_ff or (4 * d_model if family == "gpt2" else 3 * d_model)
    m.seq_len = args.seq_len
    m.vocab_size = args.vocab
    m.dtype = args.dtype
    m.attention = args.attention
    m.tie_embeddings = family == "gpt2"
    validate(cfg)
    return cfg


def random_batch(args: argparse.Namespace, seed: int = 0) -> dict[str, np.ndarray]:
    """One [1, batch, seq_len] batch of random tokens (no padding, one document per row)."""
    rng = np.random.default_rng(seed)
    shape = (1, args.batch, args.seq_len)
    tokens = rng.integers(0, args.vocab, (1, args.batch, args.seq_len + 1), dtype=np.int32)
    return {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape).copy(),
    }


def bench_lmjax(cfg: ConfigDict, args: argparse.Namespace) -> Result:
    """The jitted train step exactly as the training loop builds it (state donated)."""
    tx = make_optimizer(cfg.train)
    graphdef, _, _ = abstract_model(cfg.model)
    state = jax.jit(functools.partial(init_state, cfg.model, tx, 0))()
    batch = {k: jnp.asarray(v) for k, v in random_batch(args).items()}
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False), donate_argnums=0)

    def step() -> None:
        nonlocal state
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))

    return Result("lmjax", cfg.model.dtype, step, args.batch * args.seq_len)


def breakdown_lmjax(cfg: ConfigDict, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of parts of the step: forward, forward+backward, the full step, and on their own
    the attention core (scores, mask, softmax, weighted sum) and the output projection + loss."""
    m = cfg.model
    tx = make_optimizer(cfg.train)
    graphdef, _, _ = abstract_model(m)
    state = jax.jit(functools.partial(init_state, m, tx, 0))()
    micro = {k: jnp.asarray(v[0]) for k, v in random_batch(args).items()}
    dtype = jnp.dtype(m.dtype)

    def loss(params, batch):
        return token_losses(params, graphdef, batch).mean()

    forward = jax.jit(loss)
    grad = jax.jit(jax.value_and_grad(loss))
    full = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False))
    full_batch = {k: v[None] for k, v in micro.items()}

    b, t, h, hd = args.batch, args.seq_len, m.num_heads, ModelConfig.from_config(m).head_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (b, t, h, hd), dtype) for key in keys[:3])
    segment_ids = jnp.ones((b, t), jnp.int32)

    def attention(q, k, v):
        out = attend(q, k, v, segment_ids, m.attention)
        return out.astype(jnp.float32).sum()

    attention_grad = jax.jit(jax.grad(attention, argnums=(0, 1, 2)))
    x = jax.random.normal(keys[3], (b, t, m.d_model), dtype)
    head = state["params"]["embed"].T if m.tie_embeddings else state["params"]["lm_head"]

    def head_loss(x, head):
        logits = head_logits(x, nnx.Param(head), "btd,dv->btv", dtype)
        return optax.softmax_cross_entropy_with_integer_labels(logits, micro["targets"]).mean()

    head_grad = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
    parts = {
        "forward (loss)": lambda: forward(state["params"], micro),
        "forward+backward": lambda: grad(state["params"], micro),
        "full step (+clip, AdamW)": lambda: full(state, full_batch),
        f"attention core fwd+bwd x{m.num_layers}": lambda: attention_grad(q, k, v),
        "output projection + loss fwd+bwd": lambda: head_grad(x, head),
    }
    results = [Result(name, m.dtype, lambda fn=fn: jax.block_until_ready(fn()), 0) for name, fn in parts.items()]
    run_each(results, args.warmup, args.steps)
    return {r.name: r.step_s * (m.num_layers if "attention" in r.name else 1) for r in results}


def step_matmuls(cfg: ConfigDict, args: argparse.Namespace) -> list[tuple[str, dict[str, int], int]]:
    """The train step's projections as (einsum equation, axis sizes, how many per step): each block's query, key,
    value and output projections and MLP matrices, and the output head."""
    m = ModelConfig.from_config(cfg.model)
    sizes = dict(b=args.batch, t=m.seq_len, d=m.d_model, k=m.head_dim, f=m.d_ff, v=m.padded_vocab)
    heads, kv = dict(sizes, h=m.num_heads), dict(sizes, h=m.num_kv_heads)
    mlp = 3 if m.mlp == "swiglu" else 2  # gate, up, down or in, out
    layer = [("btd,dhk->bthk", heads, 1), ("btd,dhk->bthk", kv, 2), ("bthk,hkd->btd", heads, 1),
             ("btd,df->btf", sizes, mlp - 1), ("btf,fd->btd", sizes, 1)]
    head = "btd,vd->btv" if m.tie_embeddings else "btd,dv->btv"
    return [(eq, dims, n * m.num_layers) for eq, dims, n in layer] + [(head, sizes, 1)]


def matmul_floor(cfg: ConfigDict, args: argparse.Namespace) -> float:
    """Median seconds per step of the step's matmuls alone: the forward, input-gradient and weight-gradient
    product of every projection (`step_matmuls`), each jitted and timed on its own with inputs in the compute
    dtype, float32 accumulation and the result rounded to the compute dtype, as lmjax/model/layers.py multiplies.
    No attention core, norm, activation, loss or optimizer is in it, so no implementation of the step with these
    matmuls can run faster than this."""
    dtype = jnp.dtype(cfg.model.dtype)
    total = 0.0
    for i, (equation, dims, count) in enumerate(step_matmuls(cfg, args)):
        inputs, out = equation.split("->")
        lhs, rhs = inputs.split(",")
        for a, b, c in ((lhs, rhs, out), (out, rhs, lhs), (lhs, out, rhs)):  # forward, dx, dW
            kx, ky = jax.random.split(jax.random.PRNGKey(i))
            x = jax.random.normal(kx, [dims[axis] for axis in a], dtype)
            y = jax.random.normal(ky, [dims[axis] for axis in b], dtype)
            product = jax.jit(lambda x, y, eq=f"{a},{b}->{c}": jnp.einsum(
                eq, x, y, preferred_element_type=jnp.float32).astype(dtype))
            r = Result(equation, cfg.model.dtype, lambda f=product, x=x, y=y: jax.block_until_ready(f(x, y)), 0)
            run_each([r], args.warmup, args.steps)
            total += count * r.step_s
    return total


def bench_hf(cfg: ConfigDict, args: argparse.Namespace, bf16: bool) -> Result:
    """GPT2LMHeadModel on the same shapes: forward with labels, backward, clip, AdamW (eager PyTorch)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch_device()
    torch.manual_seed(0)
    m = cfg.model
    hf_cfg = GPT2Config(vocab_size=m.vocab_size, n_positions=m.seq_len, n_embd=m.d_model, n_layer=m.num_layers,
                        n_head=m.num_heads, n_inner=m.d_ff, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.norm_eps,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(hf_cfg).to(device).train()
    t = cfg.train
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                weight_decay=t.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                weight_decay=t.weight_decay)
    tokens = torch.from_numpy(random_batch(args)["inputs"][0].astype(np.int64)).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    name = "HF GPT-2 (bf16 autocast)" if bf16 else "HF GPT-2"
    return Result(name, "bfloat16" if bf16 else "float32", step, args.batch * args.seq_len)


def torch_device() -> str:
    """"cuda" when JAX runs on a GPU (and PyTorch sees one), else "cpu" with 2 threads like JAX here."""
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(2)
    return "cpu"


def torch_matmul_peak(dtype: str, size: int = 2048, reps: int = 7) -> float:
    """FLOP/s of torch.mm on a square matrix, for reading the HF figures."""
    import torch

    device = torch_device()
    a = torch.randn(size, size, dtype=getattr(torch, dtype), device=device)
    torch.mm(a, a)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, a)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"],
                   help="model family of each case (paired with --d-model; a single value applies to all)")
    p.add_argument("--d-model", nargs="+", type=int, default=[256, 512], help="d_model of each case")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=0, help="0 = d_model // 64")
    p.add_argument("--d-ff", type=int, default=0, help="0 = 4 x d_model (gpt2) or 3 x d_model (llama)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="lmjax compute dtype")
    p.add_argument("--attention", default="auto", help="lmjax model.attention (auto: cudnn on GPUs in bf16)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation (median)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    p.add_argument("--no-hf-bf16", action="store_true", help="skip HF under bfloat16 autocast")
    p.add_argument("--breakdown", action="store_true", help="also time parts of the lmjax step")
    p.add_argument("--matmul-floor", action="store_true",
                   help="also time the step's matmuls alone: the fastest any step with them could run")
    args = p.parse_args()
    n = max(len(args.family), len(args.d_model))
    if len(args.family) not in (1, n) or len(args.d_model) not in (1, n):
        p.error("--family and --d-model need the same number of values (or one)")
    args.cases = list(zip(args.family * (n // len(args.family)), args.d_model * (n // len(args.d_model)),
                          strict=True))
    return args


def main() -> None:
    args = parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; "
          f"batch {args.batch} x seq_len {args.seq_len}, vocab {args.vocab}, {args.layers} layers; "
          f"median of {args.steps} steps after {args.warmup} warm-up steps")
    dtypes = {args.dtype} | ({"float32", "bfloat16"} if not args.no_hf else set())
    peaks, peak_source = {}, {}
    for dt in sorted(dtypes):
        peaks[dt], peak_source[dt] = mfu_peak(dt)

    rows = []
    for family, d_model in args.cases:
        cfg = model_config(args, family, d_model)
        graphdef, shapes, _ = abstract_model(cfg.model)
        fpt = flops_per_token(cfg.model, shapes)
        label = f"{family} d{d_model} h{cfg.model.num_heads} ff{cfg.model.d_ff}"
        results = [bench_lmjax(cfg, args)]
        if family == "gpt2" and not args.no_hf:
            results.append(bench_hf(cfg, args, bf16=False))
            if not args.no_hf_bf16:
                results.append(bench_hf(cfg, args, bf16=True))
        run_each(results, args.warmup, args.steps)
        rows.append((label, fpt, results))
        if args.breakdown:
            parts = breakdown_lmjax(cfg, args)
            print(f"\nbreakdown, lmjax {label} {args.dtype} (median ms per step):")
            for name, seconds in parts.items():
                print(f"  {name:38s} {seconds * 1e3:9.1f}")
        if args.matmul_floor:
            floor = matmul_floor(cfg, args)
            tokens = args.batch * args.seq_len
            print(f"\nmatmul floor, {label} {args.dtype}: the step's matmuls alone take {floor * 1e3:.1f} ms "
                  f"({fpt * tokens / floor / 1e12:.3f} TFLOP/s): at most {tokens / floor:.0f} tokens/s; the lmjax step "
                  f"spends {floor / results[0].step_s:.0%} of its time on them")
            for r in results[1:]:
                print(f"  at that floor lmjax would be {r.step_s / floor:.2f}x {r.name}")

    if jax.default_backend() == "cpu":  # measured peaks again: a noisy host lowers one, so take the better
        for dt in peaks:
            peaks[dt] = max(peaks[dt], measure_matmul_peak(dt))
    print(f"\nMFU peak ({peak_source[args.dtype]}): "
          + ", ".join(f"{dt} {p / 1e9:.0f} GFLOP/s" for dt, p in peaks.items()))
    if not args.no_hf:
        print(f"torch.mm 2048² ({torch_device()}):                  "
              + ", ".join(f"{dt} {torch_matmul_peak(dt) / 1e9:.0f} GFLOP/s" for dt in sorted(dtypes)))

    header = (f"\n{'case':24s} {'implementation':25s} {'dtype':9s} {'GFLOP/tok':>9s} {'step ms':>8s} "
              f"{'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'lmjax/this':>10s} {'1st step s':>10s}")
    print(header)
    print("-" * (len(header) - 1))
    for label, fpt, results in rows:
        lmjax_tps = results[0].tokens_per_s
        for r in results:
            flops = fpt * r.tokens_per_s
            ratio = f"{lmjax_tps / r.tokens_per_s:.2f}x" if r.name != "lmjax" else ""
            print(f"{label:24s} {r.name:25s} {r.dtype:9s} {fpt / 1e9:9.4f} {r.step_s * 1e3:8.1f} "
                  f"{r.tokens_per_s:9.0f} {flops / 1e12:8.3f} {flops / peaks[r.dtype]:6.1%} {ratio:>10s} "
                  f"{r.compile_s:10.1f}")
    print("\nMFU = flops_per_token x tokens/s / the peak above of the row's dtype (model FLOPs only: "
          "no recomputation, attention counted without the causal halving). lmjax/this = lmjax tokens/s over "
          "the row's. 1st step = compile (lmjax) or first eager step (HF).")


if __name__ == "__main__":
    main()
