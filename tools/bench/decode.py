"""Decode throughput: lmjax KV-cache generation against Hugging Face `generate` and a no-cache baseline.

A random `transformers.GPT2LMHeadModel` is saved with `save_pretrained` and loaded into lmjax with
`load_hf_checkpoint`, so both libraries run the same weights. Every run is greedy and produces exactly
`--new-tokens` tokens per row after a `--prompt-len` prompt (no early stop). Rows:

- lmjax KV cache, jitted loop: the Sampler's jitted `prefill`/`decode`, next token kept on the device;
- lmjax Sampler.stream: the public streaming API (one host read of the tokens per step);
- lmjax no cache: the whole sequence, padded to prompt + new tokens, re-run for every new token;
- HF generate: use_cache=True, do_sample=False, min_new_tokens = max_new_tokens (PyTorch, 2 threads).

    .venv/bin/python tools/bench/decode.py
    .venv/bin/python tools/bench/decode.py --d-model 768 --layers 12 --vocab 50257 --batch 1 8
"""

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lmjax.infer.sampler import Sampler, decode, prefill
from lmjax.interop.hf import load_hf_checkpoint
from lmjax.model.params import Params, abstract_model
from lmjax.model.transformer import init_cache


class _NoTextTokenizer:
    """The slice of the Tokenizer interface that `Sampler.stream` uses, without text: ids are taken
    as given (`prompt_ids`), nothing stops generation and decoding returns no text."""

    bos_id = 0
    eos_id = -1
    stop_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return []

    def decode(self, ids) -> str:
        return ""


def save_random_gpt2(args: argparse.Namespace, out_dir: Path):
    """A randomly initialised GPT2LMHeadModel (eval mode), also written to `out_dir`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.prompt_len + args.new_tokens, n_embd=args.d_model,
                     n_layer=args.layers, n_head=args.heads or max(args.d_model // 64, 1),
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out_dir)
    return model


def timed(fn: Callable[[], np.ndarray], reps: int) -> tuple[float, np.ndarray]:
    """(median seconds of `reps` calls after one untimed warm-up call, the last call's output)."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def lmjax_kv(cfg: ConfigDict, params: Params, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """Greedy generation with the Sampler's jitted prefill/decode; only the final tokens go to the host."""
    graphdef, _, _ = abstract_model(cfg)
    prefill_fn = jax.jit(functools.partial(prefill, graphdef=graphdef), donate_argnums=3)
    decode_fn = jax.jit(functools.partial(decode, graphdef=graphdef), donate_argnums=2)
    greedy = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))
    batch, prompt_len = prompts.shape
    tokens, lengths = jnp.asarray(prompts), jnp.full((batch,), prompt_len, jnp.int32)
    settings = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    rng = jax.random.PRNGKey(0)

    def run() -> np.ndarray:
        cache = init_cache(cfg, batch, prompt_len + new_tokens)
        logits, cache = prefill_fn(params, tokens, lengths, cache)
        token = greedy(logits)
        out = [token]
        for _ in range(new_tokens - 1):
            token, cache = decode_fn(params, token, cache, rng, *settings)
            out.append(token)
        return np.asarray(jnp.stack(out, axis=1))

    return run


def lmjax_stream(cfg: ConfigDict, params: Params, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """Greedy generation through `Sampler.stream` (temperature 0), the path the CLI and chat use."""
    graphdef, _, _ = abstract_model(cfg)
    sampler = Sampler(cfg, graphdef, params, _NoTextTokenizer(), max_len=prompts.shape[1] + new_tokens)
    ids = prompts.tolist()

    def run() -> np.ndarray:
        for _ in sampler.stream([], new_tokens, temperature=0.0, prompt_ids=ids):
            pass
        return np.zeros((len(ids), new_tokens), np.int32)

    return run


def lmjax_no_cache(cfg: ConfigDict, params: Params, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """Greedy generation that re-runs the whole sequence (padded to prompt + new tokens, so one compile)
    for every new token."""
    graphdef, _, _ = abstract_model(cfg)
    batch, prompt_len = prompts.shape
    total = prompt_len + new_tokens
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))
    segments = jnp.ones((batch, total), jnp.int32)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params: Params, seq: jax.Array, length: jax.Array) -> jax.Array:
        logits, _ = nnx.merge(graphdef, params)(seq, positions, segments)
        last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(seq, token[:, None], (0, length))

    start = np.zeros((batch, total), np.int32)
    start[:, :prompt_len] = prompts

    def run() -> np.ndarray:
        seq = jnp.asarray(start)
        for i in range(new_tokens):
            seq = step(params, seq, jnp.int32(prompt_len + i))
        return np.asarray(seq[:, prompt_len:])

    return run


def hf_generate(model, prompts: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """Greedy `model.generate` with the KV cache, never stopping before `new_tokens`."""
    import torch

    ids = torch.from_numpy(prompts.astype(np.int64))
    mask = torch.ones_like(ids)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()

    return run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=0, help="0 = d_model // 64")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="batch sizes (the first is the base)")
    p.add_argument("--reps", type=int, default=3, help="timed generations per row (median)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="skip lmjax bfloat16")
    p.add_argument("--no-cache-batches", nargs="*", type=int, default=[1],
                   help="batch sizes for the no-cache baseline (none to skip it)")
    return p.parse_args()


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = save_random_gpt2(args, Path(tmp))
        loaded = {dt: load_hf_checkpoint(tmp, dt) for dt in (["float32"] + ([] if args.no_bf16 else ["bfloat16"]))}
    cfg = loaded["float32"][0]
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); GPT-2 "
          f"d{cfg.d_model} x{cfg.num_layers} layers, {cfg.num_heads} heads, vocab {cfg.vocab_size}; greedy, "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens per row; median of {args.reps} runs")
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, int, float]] = []
    outputs: dict[tuple[str, int], np.ndarray] = {}
    for batch in args.batch:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len), dtype=np.int32)
        runs: list[tuple[str, str, Callable[[], np.ndarray]]] = []
        for dt, (dt_cfg, params) in loaded.items():
            params = jax.device_put(params)
            runs.append(("lmjax KV cache, jitted loop", dt, lmjax_kv(dt_cfg, params, prompts, args.new_tokens)))
            runs.append(("lmjax Sampler.stream", dt, lmjax_stream(dt_cfg, params, prompts, args.new_tokens)))
            if dt == "float32" and batch in args.no_cache_batches:
                runs.append(("lmjax no cache (re-forward)", dt,
                             lmjax_no_cache(dt_cfg, params, prompts, args.new_tokens)))
        if not args.no_hf:
            runs.append(("HF generate", "float32", hf_generate(hf_model, prompts, args.new_tokens)))
        for name, dt, fn in runs:
            seconds, out = timed(fn, args.reps)
            rows.append((name, dt, batch, batch * args.new_tokens / seconds))
            outputs[(f"{name} {dt}", batch)] = out
            print(f"  {name:30s} {dt:9s} batch {batch:3d}: {batch * args.new_tokens / seconds:9.1f} tokens/s",
                  flush=True)

    base = args.batch[0]
    hf_base = {b: tps for name, _, b, tps in rows if name == "HF generate"}
    header = f"\n{'implementation':30s} {'dtype':9s} {'batch':>5s} {'tokens/s':>10s} {'ms/step':>8s} " \
             f"{'vs HF':>7s} {f'vs batch {base}':>11s}"
    print(header)
    print("-" * (len(header) - 1))
    for name, dt, batch, tps in rows:
        same_base = [t for n, d, b, t in rows if n == name and d == dt and b == base]
        vs_hf = f"{tps / hf_base[batch]:.2f}x" if batch in hf_base else ""
        vs_base = f"{tps / same_base[0]:.2f}x" if same_base and batch != base else ""
        print(f"{name:30s} {dt:9s} {batch:5d} {tps:10.1f} {batch / tps * 1e3:8.2f} {vs_hf:>7s} {vs_base:>11s}")
    for batch in args.batch:
        ref = outputs.get(("HF generate float32", batch))
        ours = outputs.get(("lmjax KV cache, jitted loop float32", batch))
        if ref is not None and ours is not None:
            print(f"greedy tokens equal to HF at batch {batch}: {np.mean(ref == ours):.1%}")
    print("'vs HF' = tokens/s over HF generate at the same batch; 'vs batch N' = over the same row at batch N; "
          "ms/step = wall time per decode step (one token for every row).")


if __name__ == "__main__":
    main()
