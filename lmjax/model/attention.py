"""Causal multi-head / grouped-query self-attention with segment masking and an optional KV cache."""

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.model.attention_kernels import attend
from lmjax.model.config import ModelConfig
from lmjax.model.layers import RMSNorm, apply_rope, param, project
from lmjax.parallel.rules import constrain


def write_at(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """`buffer` [B, S, ...] with each row's `update` [B, T, ...] written from its own slot `index[b]` on."""
    write = lambda row, new, i: jax.lax.dynamic_update_slice_in_dim(row, new.astype(row.dtype), i, axis=0)
    return jax.vmap(write)(buffer, update, index)


def update_cache(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array) -> dict:
    """A layer's cache with keys and values [B, T, KV, D] written from each row's `index`; an int8 cache stores
    each token's head vector rounded to int8 with its own scale (max |x| / 127)."""
    new = {}
    for name, x in (("k", k), ("v", v)):
        if cache[name].dtype == jnp.int8:
            scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127
            scale = jnp.where(scale == 0, 1.0, scale)
            x = jnp.round(x.astype(jnp.float32) / scale[..., None])
            new[f"{name}_scale"] = write_at(cache[f"{name}_scale"], scale, index)
        new[name] = write_at(cache[name], x, index)
    return new


def read_cache(cache: dict, name: str, dtype: jnp.dtype) -> jax.Array:
    """Keys or values of a layer's cache in `dtype` (an int8 cache scaled back)."""
    x = cache[name]
    if x.dtype == jnp.int8:
        return (x.astype(jnp.float32) * cache[f"{name}_scale"][..., None]).astype(dtype)
    return x.astype(dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention of queries [B, T, H, D] over a cache's keys/values [B, S, KV, D] where `mask`
    [B, T, S] allows. Two einsums with the query heads grouped per key/value head: on CPU about twice as fast
    as `jax.nn.dot_product_attention` for decoding (many rows, T = 1), whose batched small matmuls dominate
    a decode step there (docs/benchmarks.md, "Serving"). Scores and softmax in float32."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    grouped = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


class Attention(nnx.Module):
    """Self-attention. Training: causal within each packed segment, by the implementation `model.attention`
    names (lmjax/model/attention_kernels.py). Decoding: keys and values go into
    a fixed-size cache from each row's own slot `index[b]`, and queries see every valid slot of their row up to
    their own."""

    def __init__(self, cfg: ModelConfig, out_std: float | None, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.implementation = cfg.attention
        # RoPE inverse frequencies as a static tuple (not a parameter); None for GPT-2's learned positions.
        self.rope = None if cfg.arch.learned_positions else tuple(cfg.rope_frequencies().tolist())
        self.query = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pdt)
        self.key = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.value = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.out = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pdt, std=out_std)
        self.use_bias = cfg.arch.attention_bias  # on all four projections
        self.qkv_bias = self.use_bias or cfg.qkv_bias
        if self.qkv_bias:
            self.query_bias = param(rngs, (h, hd), ("heads", "head_dim"), pdt, std=None)
            self.key_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), pdt, std=None)
            self.value_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), pdt, std=None)
        if self.use_bias:
            self.out_bias = param(rngs, (d,), ("embed",), pdt, std=None)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one scale per head_dim channel, shared by the heads (as in OLMo 2 and Qwen3)
            self.query_norm = RMSNorm(hd, cfg.norm_eps, pdt, rngs, axis="head_dim")
            self.key_norm = RMSNorm(hd, cfg.norm_eps, pdt, rngs, axis="head_dim")

    def _project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        biases = (self.query_bias, self.key_bias, self.value_bias) if self.qkv_bias else (None, None, None)
        q = project(x, self.query, "btd,dhk->bthk", self.dtype, biases[0])
        k = project(x, self.key, "btd,dhk->bthk", self.dtype, biases[1])
        v = project(x, self.value, "btd,dhk->bthk", self.dtype, biases[2])
        if self.qk_norm:
            q, k = self.query_norm(q), self.key_norm(k)
        if self.rope is not None:
            q = apply_rope(q, positions, self.rope)
            k = apply_rope(k, positions, self.rope)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: dict | None = None, valid: jax.Array | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """x [batch, length, d_model] -> (output like x, updated layer cache or None).

        With a cache ({'k', 'v'} of [batch, max_len, kv_heads, head_dim]), `valid` [batch, max_len] marks
        slots that hold real tokens (already including this call's) and `index` [batch] is each row's first slot
        written, so rows may hold sequences of different lengths.
        """
        q, k, v = self._project_qkv(x, positions)
        length = x.shape[1]
        if cache is None:
            attended = attend(q, k, v, segment_ids, self.implementation)
        else:
            cache = update_cache(cache, k, v, index)
            k, v = read_cache(cache, "k", q.dtype), read_cache(cache, "v", q.dtype)
            query_slot = index[:, None] + jnp.arange(length)
            key_slot = jnp.arange(k.shape[1])
            seen = key_slot <= query_slot[..., None]
            mask = (valid[:, None, :] & seen) | (key_slot == query_slot[..., None])
            attended = cached_attention(q, k, v, mask)
        out = project(attended, self.out, "bthk,hkd->btd", self.dtype, self.out_bias if self.use_bias else None)
        return out, cache
