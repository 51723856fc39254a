"""Building blocks: parameters with logical axes, projections, norms, RoPE, dropout."""

import contextlib
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmjax.model.lora import LoraWeight, lora_equations
from lmjax.model.quantized import QArray, qeinsum
from lmjax.parallel.rules import constrain

PROJECTION = "projection"  # name of every `project` output (the matmuls without batch dimensions)

# While `record_inputs` is active: id of each projected weight's nnx.Param -> sum over tokens of its
# input's squares per contracted feature (for Wanda's calibration, lmjax/compress/prune.py).
_INPUT_NORMS: dict[int, jax.Array] | None = None


@contextlib.contextmanager
def record_inputs() -> Iterator[dict[int, jax.Array]]:
    """Within the block, every `project` (and `head_logits`) call adds its input's per-feature sum of squares,
    keyed by the id of its weight's `nnx.Param`, to the dict it yields. For calibration only: a trace-time
    hook, so use it around a model call inside one jitted function that returns the dict."""
    global _INPUT_NORMS
    previous, _INPUT_NORMS = _INPUT_NORMS, {}
    try:
        yield _INPUT_NORMS
    finally:
        _INPUT_NORMS = previous


def _record(w: nnx.Param, x: jax.Array, contracted: int) -> None:
    if _INPUT_NORMS is not None:
        squares = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(x.ndim - contracted)))
        _INPUT_NORMS[id(w)] = _INPUT_NORMS.get(id(w), 0) + squares


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype: jnp.dtype,
          std: float | None = 0.02, value: float = 0.0) -> nnx.Param:
    """A parameter drawn from N(0, std²) (or filled with `value` when std is None), tagged with
    logical `axes` that the sharding rules map to mesh axes."""
    if std is None:
        data = jnp.full(shape, value, dtype)
    else:
        data = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(data, axes=tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(equation, x, w)` of same-dtype inputs with a float32 result. Its backward matmuls also
    take inputs in that dtype and accumulate in float32; left to autodiff, the float32 cotangent would
    promote them to float32 matmuls (several times slower in bfloat16 on CPUs). Rounding the cotangent
    to the input dtype is exact where the result is rounded to it straight after, as in `project`; for the
    output head's float32 logits it rounds their gradient to the compute dtype, as PyTorch's autocast does."""
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(equation: str, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _einsum_f32(equation, x, w), (x, w)


def _einsum_f32_bwd(equation: str, residuals: tuple[jax.Array, jax.Array],
                    g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def project(x: jax.Array, w: nnx.Param, equation: str, dtype: jnp.dtype,
            bias: nnx.Param | None = None) -> jax.Array:
    """`einsum(equation, x, w) + bias` with both matmul inputs in the compute dtype, float32 accumulation
    (forward and backward) and the bias added in float32 before rounding to the compute dtype. The result
    is named `PROJECTION` for rematerialisation policies: the custom VJP hides its matmul from JAX's
    dot-based policies, so `model.remat="dots"` saves these names instead. A quantized weight (`QArray`, from
    `lmjax compress` or a LoRA run's int8 base) is multiplied by `qeinsum`; a `LoraWeight` adds its adapter
    path (lmjax/model/lora.py) to its base weight's product."""
    value = w.get_value()
    lora = value if isinstance(value, LoraWeight) else None
    if lora is not None:
        value = lora.w
    if isinstance(value, QArray):
        out = qeinsum(equation, x, value, dtype)
    else:
        _record(w, x, _contracted(equation))
        out = _einsum_f32(equation, x.astype(dtype), value.astype(dtype))
    if lora is not None:
        out = out + _lora_path(x, lora, equation, dtype)
    if bias is not None:
        out = out + bias[...].astype(jnp.float32)
    return checkpoint_name(out.astype(dtype), PROJECTION)


def _lora_path(x: jax.Array, lora: LoraWeight, equation: str, dtype: jnp.dtype) -> jax.Array:
    """scale x (dropout(x) a) b in float32, both matmuls with inputs in the compute dtype like the base's."""
    to_a, to_b = lora_equations(equation)
    x = dropout(x, lora.dropout, lora.dropout_rng).astype(dtype)
    h = _einsum_f32(to_a, x, lora.a.astype(dtype)).astype(dtype)
    return lora.scale * _einsum_f32(to_b, h, lora.b.astype(dtype))


def head_logits(x: jax.Array, w: nnx.Param, equation: str, dtype: jnp.dtype) -> jax.Array:
    """The output head's float32 logits, `einsum(equation, x, w)` with x in the compute dtype (w may be
    quantized); the backward multiplies in the compute dtype too (`_einsum_f32`: 1.2-1.4x faster head and loss
    in bfloat16 on CPUs, docs/benchmarks.md)."""
    value = w.get_value()
    if isinstance(value, QArray):
        return qeinsum(equation, x, value, dtype)
    _record(w, x, _contracted(equation))
    return _einsum_f32(equation, x.astype(dtype), value.astype(dtype))


def _contracted(equation: str) -> int:
    """How many axes `equation` (lhs,rhs->out) contracts."""
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    return sum(c in rhs and c not in out for c in lhs)


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
    """Root-mean-square norm over the last axis with a scale, computed in float32 (Llama); `axis` is the scale's
    logical axis."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs, axis: str = "embed"):
        self.eps = eps
        self.scale = param(rngs, (dim,), (axis,), param_dtype, std=None, value=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return (h * self.scale[...]).astype(x.dtype)


class GeluMLP(nnx.Module):
    """GPT-2 MLP: Linear -> GELU (tanh approximation) -> Linear, with biases."""

    def __init__(self, d_model: int, d_ff: int, out_std: float | None, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.fc_in = param(rngs, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.fc_in_bias = param(rngs, (d_ff,), ("mlp",), param_dtype, std=None)
        self.fc_out = param(rngs, (d_ff, d_model), ("mlp", "embed"), param_dtype, std=out_std)
        self.fc_out_bias = param(rngs, (d_model,), ("embed",), param_dtype, std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = project(x, self.fc_in, "btd,df->btf", self.dtype, self.fc_in_bias)
        h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        return project(h, self.fc_out, "btf,fd->btd", self.dtype, self.fc_out_bias)


class SwiGLU(nnx.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d_model: int, d_ff: int, out_std: float | None, dtype: jnp.dtype, param_dtype: jnp.dtype,
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


class ReluSquaredMLP(nnx.Module):
    """down(relu(up(x))²), no biases: the squared-ReLU MLP of the nanoGPT speedruns (one matrix fewer than
    SwiGLU at the same d_ff)."""

    def __init__(self, d_model: int, d_ff: int, out_std: float | None, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.up = param(rngs, (d_model, d_ff), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, (d_ff, d_model), ("mlp", "embed"), param_dtype, std=out_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = project(x, self.up, "btd,df->btf", self.dtype)
        h = constrain(jnp.square(jax.nn.relu(h)), ("batch", "length", "mlp"))
        return project(h, self.down, "btf,fd->btd", self.dtype)


MLPS = {"gelu": GeluMLP, "swiglu": SwiGLU, "relu2": ReluSquaredMLP}


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: Sequence[float]) -> jax.Array:
    """Rotary position embedding on [batch, length, heads, head_dim], half-split layout (as in Llama/HF), with
    inverse frequencies `inv_freq` [head_dim / 2] (`ModelConfig.rope_frequencies`)."""
    half = x.shape[-1] // 2
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
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
