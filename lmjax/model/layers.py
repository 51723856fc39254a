"""Building blocks: parameters with logical axes, projections, norms, RoPE, dropout."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.parallel.rules import constrain


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype: jnp.dtype,
          std: float | None = 0.02, value: float = 0.0) -> nnx.Param:
    """A parameter drawn from N(0, std²) (or filled with `value` when std is None), tagged with
    logical `axes` that the sharding rules map to mesh axes."""
    if std is None:
        data = jnp.full(shape, value, dtype)
    else:
        data = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(data, axes=tuple(axes))


def project(x: jax.Array, w: nnx.Param, equation: str, dtype: jnp.dtype) -> jax.Array:
    """`einsum(equation, x, w)` with both inputs in the compute dtype and float32 accumulation."""
    out = jnp.einsum(equation, x.astype(dtype), w[...].astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32 (GPT-2)."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), param_dtype, std=None, value=1.0)
        self.bias = param(rngs, (dim,), ("embed",), param_dtype, std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...] + self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a scale, computed in float32 (Llama)."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), param_dtype, std=None, value=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return (h * self.scale[...]).astype(x.dtype)


class GeluMLP(nnx.Module):
    """GPT-2 MLP: Linear -> GELU (tanh approximation) -> Linear, with biases."""

    def __init__(self, d_model: int, d_ff: int, out_std: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.fc_in = param(rngs, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.fc_in_bias = param(rngs, (d_ff,), ("mlp",), param_dtype, std=None)
        self.fc_out = param(rngs, (d_ff, d_model), ("mlp", "embed"), param_dtype, std=out_std)
        self.fc_out_bias = param(rngs, (d_model,), ("embed",), param_dtype, std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = project(x, self.fc_in, "btd,df->btf", self.dtype) + self.fc_in_bias[...].astype(self.dtype)
        h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        return project(h, self.fc_out, "btf,fd->btd", self.dtype) + self.fc_out_bias[...].astype(self.dtype)


class SwiGLU(nnx.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d_model: int, d_ff: int, out_std: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, (d_ff, d_model), ("mlp", "embed"), param_dtype, std=out_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(x, self.gate, "btd,df->btf", self.dtype)
        up = project(x, self.up, "btd,df->btf", self.dtype)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return project(h, self.down, "btf,fd->btd", self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on [batch, length, heads, head_dim], half-split layout (as in Llama/HF)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `rng` is None (evaluation, sampling) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
