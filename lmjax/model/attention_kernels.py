"""The implementations of training / prefill attention that `model.attention` picks from.

Each takes queries [B, T, H, D], keys and values [B, T, KV, D] (H a multiple of KV: grouped-query
attention) and `segment_ids` [B, T], and lets a query see the keys at or before it in its own packed
segment (padding, segment 0, is one more segment). All compute scores and softmax in float32.

    xla        `jax.nn.dot_product_attention` with a materialised [B, 1, T, T] mask: the reference; it keeps
               the [B, H, T, T] probabilities for the backward pass.
    blockwise  pure JAX flash attention (online softmax over key blocks, a custom VJP that recomputes them),
               memory O(T) per row; runs everywhere.
    cudnn      cuDNN's fused flash attention (GPU, bfloat16 / float16).
    splash     the Pallas splash-attention kernel (TPU).
    auto       splash on TPU, cudnn on GPU where cuDNN supports the dtype and head width, else xla.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from lmjax.config import ConfigError
from lmjax.parallel.rules import active_mesh, logical_to_spec

# Query and key block of `blockwise_attention` (tokens); shorter sequences are one block.
BLOCK = 128
# Splash attention's tiles must be multiples of 128 tokens; sequences are padded up to a multiple of this.
SPLASH_MULTIPLE = 128
HALF_DTYPES = ("bfloat16", "float16")
# On a CPU, `auto` runs blockwise attention from this many tokens on: measured on the gpt2 d512 train step in
# float32 (docs/benchmarks.md), it was 1.34x XLA's at 1024 tokens, even at 512 and 3% slower at 256.
CPU_BLOCKWISE_FROM = 1024


def resolve_attention(name: str, backend: str, dtype: str, head_dim: int, length: int) -> str:
    """The implementation `model.attention=name` runs on `backend` ("cpu", "gpu", "tpu") with compute `dtype`
    over sequences of `length` tokens: `auto` resolved, and a ConfigError for an explicit choice the backend or
    dtype cannot run."""
    if name == "auto":
        if backend == "tpu":
            return "splash"
        if backend == "cpu":
            return "blockwise" if length >= CPU_BLOCKWISE_FROM else "xla"
        cudnn_fits = dtype in HALF_DTYPES and head_dim % 8 == 0 and head_dim <= 128
        return "cudnn" if backend == "gpu" and cudnn_fits else "xla"
    if name == "cudnn" and dtype not in HALF_DTYPES:
        raise ConfigError(f"model.attention=cudnn needs model.dtype bfloat16 or float16 (cuDNN's flash attention), "
                          f"got {dtype}")
    if name == "cudnn" and backend != "gpu":
        raise ConfigError(f"model.attention=cudnn runs only on GPUs; this backend is {backend} "
                          "(use auto, xla or blockwise)")
    if name == "splash" and backend != "tpu":
        raise ConfigError(f"model.attention=splash runs only on TPUs; this backend is {backend} "
                          "(use auto, xla or blockwise)")
    return name


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, implementation: str) -> jax.Array:
    """Causal attention within packed segments by `implementation` (a `model.attention` value, resolved for
    the default backend) -> [B, T, H, D] in q's dtype."""
    name = resolve_attention(implementation, jax.default_backend(), q.dtype.name, q.shape[-1], q.shape[1])
    if name == "splash":
        return _sharded_splash(q, k, v, segment_ids)
    return {"xla": xla_attention, "cudnn": cudnn_attention, "blockwise": blockwise_attention}[name](
        q, k, v, segment_ids)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: query t may see key s (s <= t, same segment)."""
    length = segment_ids.shape[1]
    return _same_segment(segment_ids) & jnp.tril(jnp.ones((length, length), bool))


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The reference: XLA's attention with the full mask, probabilities [B, H, T, T] materialised."""
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), scale=q.shape[-1] ** -0.5)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`), causal by `is_causal`.

    The installed JAX's public API takes only per-row lengths (`query_seq_lengths`), not several packed
    documents per row, so the segments go in as a boolean `mask` [B, 1, T, T], which cuDNN reads as an
    additive bias shared by the heads: [B, 1, T, T] in the compute dtype (and its gradient, which JAX's
    binding always computes) instead of XLA's [B, H, T, T] float32 probabilities. Training with a bias
    needs an even length, so odd lengths are padded by one token (causality keeps it unseen)."""
    length = q.shape[1]
    q, k, v, segment_ids = _pad_length((q, k, v, segment_ids), 2)
    out = jax.nn.dot_product_attention(q, k, v, mask=_same_segment(segment_ids), scale=q.shape[-1] ** -0.5,
                                       is_causal=True, implementation="cudnn")
    return out[:, :length]


def _same_segment(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: query t and key s are in the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _pad_length(arrays: tuple[jax.Array, ...], multiple: int) -> tuple[jax.Array, ...]:
    """`arrays` with their length axis (1) zero-padded to a multiple of `multiple`. Padded keys come after every
    real query, so causality hides them; padded queries are cut off afterwards."""
    pad = -arrays[0].shape[1] % multiple
    if not pad:
        return arrays
    return tuple(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in arrays)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                        block: int = BLOCK) -> jax.Array:
    """Flash attention in pure JAX: for each block of `block` queries, an online softmax over the key blocks
    at or before it (blocks above the diagonal are never computed), float32 accumulators, and never more
    than [B, H, block, block] scores at a time. Differentiable through a custom VJP (FlashAttention-2's
    backward: it keeps the output and the log-sum-exp [B, H, T] and recomputes each block's probabilities,
    once for the query gradients and once for the key / value gradients)."""
    b, length, h, d = q.shape
    kv = k.shape[2]
    block = min(block, length)
    q, k, v, segment_ids = _pad_length((q, k, v, segment_ids), block)
    n = q.shape[1] // block
    # Blocks first: [n, B, block, KV, G, D] queries, [n, B, block, KV, D] keys / values, [n, B, block] segments.
    to_blocks = lambda x: jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)
    out = _flash(to_blocks(q.reshape(b, n * block, kv, h // kv, d)), to_blocks(k), to_blocks(v),
                 to_blocks(segment_ids))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * block, h, d)[:, :length]


def _block_scores(q: jax.Array, k: jax.Array, seg_q: jax.Array, seg_k: jax.Array, i: jax.Array,
                  j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scaled float32 scores [B, KV, G, block, block] of query block `i` against key block `j`, and where
    they are allowed [B, 1, 1, block, block] (causal, same segment)."""
    block, d = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * d**-0.5
    offsets = jnp.arange(block)
    causal = (i * block + offsets)[:, None] >= (j * block + offsets)[None, :]
    allowed = (seg_q[:, :, None] == seg_k[:, None, :]) & causal
    return scores, allowed[:, None, None]


def _flash_forward(q, k, v, seg) -> tuple[jax.Array, jax.Array]:
    """Blocked output [n, B, block, KV, G, D] and log-sum-exp [n, B, KV, G, block] (float32)."""
    _, b, block, kv, g, d = q.shape
    floor = jnp.finfo(jnp.float32).min

    def query_block(args):
        i, q_i, seg_i = args

        def key_block(j, carry):
            acc, row_max, row_sum = carry
            scores, allowed = _block_scores(q_i, k[j], seg_i, seg[j], i, j)
            new_max = jnp.maximum(row_max, jnp.where(allowed, scores, floor).max(-1))
            probs = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
            rescale = jnp.exp(row_max - new_max)
            acc = acc * rescale[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", probs.astype(v.dtype), v[j],
                                                        preferred_element_type=jnp.float32)
            return acc, new_max, row_sum * rescale + probs.sum(-1)

        init = (jnp.zeros((b, kv, g, block, d), jnp.float32), jnp.full((b, kv, g, block), floor),
                jnp.zeros((b, kv, g, block), jnp.float32))
        acc, row_max, row_sum = jax.lax.fori_loop(0, i + 1, key_block, init)  # the diagonal block is the last
        out = jnp.einsum("bkgqd->bqkgd", acc / row_sum[..., None]).astype(q.dtype)
        return out, row_max + jnp.log(row_sum)

    return jax.lax.map(query_block, (jnp.arange(q.shape[0]), q, seg))


@jax.custom_vjp
def _flash(q, k, v, seg):
    return _flash_forward(q, k, v, seg)[0]


def _flash_fwd(q, k, v, seg):
    out, lse = _flash_forward(q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(residuals, d_out):
    q, k, v, seg, out, lse = residuals
    n, scale = q.shape[0], q.shape[-1] ** -0.5
    # Row sums of d_out * out: the softmax gradient's correction term, [n, B, KV, G, block].
    delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def grads_of_scores(i, j, q_i, k_j, v_j, do_i):
        """Probabilities and the scores' gradient of query block i against key block j."""
        scores, allowed = _block_scores(q_i, k_j, seg[i], seg[j], i, j)
        probs = jnp.where(allowed, jnp.exp(scores - lse[i][..., None]), 0.0)
        d_probs = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
        return probs, probs * (d_probs - delta[i][..., None])

    def query_grads(args):
        i, q_i, do_i = args

        def key_block(j, dq):
            _, d_scores = grads_of_scores(i, j, q_i, k[j], v[j], do_i)
            return dq + jnp.einsum("bkgqs,bskd->bqkgd", d_scores.astype(k.dtype), k[j],
                                   preferred_element_type=jnp.float32)

        return (jax.lax.fori_loop(0, i + 1, key_block, jnp.zeros(q_i.shape, jnp.float32)) * scale).astype(q.dtype)

    def key_value_grads(args):
        j, k_j, v_j = args

        def query_block(i, carry):
            dk, dv = carry
            probs, d_scores = grads_of_scores(i, j, q[i], k_j, v_j, d_out[i])
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", probs.astype(v.dtype), d_out[i],
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", d_scores.astype(q.dtype), q[i],
                                 preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dk, dv = jax.lax.fori_loop(j, n, query_block, (zeros, zeros))  # query blocks at or below the diagonal
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    blocks = jnp.arange(n)
    dq = jax.lax.map(query_grads, (blocks, q, d_out))
    dk, dv = jax.lax.map(key_value_grads, (blocks, k, v))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     interpret: bool = False) -> jax.Array:
    """The Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) on one
    device's shard: a causal mask, the segments as its `SegmentIds`, grouped-query heads natively, its own
    custom VJP. Its tiles are multiples of 128 tokens, so the length is padded to one. `interpret=True` runs
    the kernel in Pallas's interpreter, on any backend (slow; for tests on CPU)."""
    length, d = q.shape[1], q.shape[-1]
    q, k, v, segment_ids = _pad_length((q, k, v, segment_ids), SPLASH_MULTIPLE)
    padded = q.shape[1]
    tile = max(t for t in (128, 256, 512) if padded % t == 0)
    tiles = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                              block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
    mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * q.shape[2])
    kernel = splash.make_splash_mha(mask, block_sizes=tiles, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    run = lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s))
    out = jax.vmap(run)(heads_first(q * d**-0.5), heads_first(k), heads_first(v), segment_ids)
    return heads_first(out)[:, :length]


def _sharded_splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    interpret: bool = False) -> jax.Array:
    """`splash_attention` on every device's shard of the batch and heads: a Pallas kernel is opaque to the
    compiler's partitioner, so under a mesh (`use_rules`) it runs inside `shard_map`. The length axis must
    not be sharded (the kernel needs the whole sequence)."""
    run = functools.partial(splash_attention, interpret=interpret)
    active = active_mesh()
    if active is None:
        return run(q, k, v, segment_ids)
    mesh, rules = active
    spec = lambda x, axes: logical_to_spec(axes, rules, mesh.shape, x.shape)
    q_spec = spec(q, ("batch", "length", "heads", "head_dim"))
    kv_spec = spec(k, ("batch", "length", "kv_heads", "head_dim"))
    if q_spec[1] is not None or q_spec[3] is not None or q_spec[2] != kv_spec[2]:
        raise ConfigError("model.attention=splash needs the length and head_dim axes unsharded and the heads "
                          "sharded like the key/value heads (mesh.rules)")
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)

