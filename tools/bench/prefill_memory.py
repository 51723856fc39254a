"""Prefill memory: XLA's compiled memory analysis of a prefill that computes the output head only at each
prompt's last token (`prefill`, `logits_at`) against one that computes the logits at every position and then
keeps the last (what a prefill did before), for a large vocabulary. Compile only: nothing runs, so it takes
seconds on any machine and reports what the program needs on the device it is compiled for.

    .venv/bin/python tools/bench/prefill_memory.py                  # batch 4 x 2048 tokens, vocabulary 128k
    .venv/bin/python tools/bench/prefill_memory.py --vocab 32000 --batch 8 --prompt 1024
"""

import argparse

import jax
import jax.numpy as jnp

from lmjax.config import base_config
from lmjax.infer.sampler import prefill, prefill_logits
from lmjax.model.config import ModelConfig
from lmjax.model.params import abstract_model
from lmjax.model.transformer import init_cache


def every_position_then_last(params, tokens, lengths, cache, *, graphdef):
    """The peer: logits at every position [B, P, V], then each row's last."""
    logits, cache = prefill_logits(params, tokens, lengths, cache, graphdef=graphdef)
    return logits[jnp.arange(tokens.shape[0]), lengths - 1], cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128_000, help="vocabulary size")
    p.add_argument("--batch", type=int, default=4, help="prompts per prefill")
    p.add_argument("--prompt", type=int, default=2048, help="prompt bucket (tokens)")
    p.add_argument("--d-model", type=int, default=256, help="model width (the head is d_model x vocab)")
    args = p.parse_args()
    m = base_config().model
    m.update(family="llama", vocab_size=args.vocab, num_layers=2, num_heads=4, num_kv_heads=2, d_model=args.d_model,
             d_ff=2 * args.d_model, seq_len=args.prompt, dtype="float32")
    graphdef, params, _ = abstract_model(m)
    tokens = jax.ShapeDtypeStruct((args.batch, args.prompt), jnp.int32)
    lengths = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(ModelConfig.from_config(m), args.batch, args.prompt))
    print(f"{jax.devices()[0].device_kind}: batch {args.batch} x {args.prompt} tokens, vocabulary {args.vocab:,}, "
          f"d_model {args.d_model}, float32")
    temps = {}
    variants = (("last token only (prefill)", prefill), ("every position, then the last", every_position_then_last))
    for name, fn in variants:
        compiled = jax.jit(fn, static_argnames="graphdef").lower(params, tokens, lengths, cache,
                                                                  graphdef=graphdef).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
        print(f"  {name:<30} temporaries {temps[name] / 2**20:8,.0f} MiB")
    ours, peer = temps.values()
    print(f"  ratio {ours / peer:.2f}x the peer's temporaries")


if __name__ == "__main__":
    main()
