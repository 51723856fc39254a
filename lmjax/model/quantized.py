"""Quantized weights (symmetric int8 per output channel, int4 in groups along the contracted axis) and the
matmul that reads them.

A quantized weight is a `QArray` leaf in the params tree where the float array was; `nnx.merge` puts it in the
model's `nnx.Param` and `layers.project` (and the output head) multiply by it with `qeinsum`. It holds the matrix
that multiplies the input, flattened to [K contracted, N outputs] (the tied embedding [V, D] is stored as its
head [D, V]), with one float32 scale per group of `K // G` contracted rows and output: [G, N]. Int8 is int4's
case with G = 1 and 127 levels instead of 7. Int4 values are stored one per byte (`int8`): files and
memory hold 1 byte per weight either way; packing two per byte is left for later.

`qeinsum` has two ways to multiply, `MATMULS`:
- "dequant": the weight is scaled back to the compute dtype and multiplied as usual. Exact to the rounding of
  the weights; on GPUs and TPUs XLA fuses the scaling into the matmul, so only the int8 bytes are read.
- "int8": each input row is rounded to int8 with its own scale (dynamic per-token quantization) and
  multiplied int8 x int8 -> int32, then scaled by both scales. XLA:CPU has no fused dequantizing matmul (it
  would widen every weight to float32 at every step) but does run integer matmuls, so this is the fast
  path on CPUs; it adds the rounding of activations to that of weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

MATMULS = ("dequant", "int8")
LEVELS = {"int8": 127, "int4": 7}  # largest magnitude of each format (symmetric: -L..L)


@struct.dataclass
class QArray:
    """A quantized weight: `q` [K, N] int8, `scale` [G, N] float32; `shape` is the original weight's shape,
    `transposed` says its contracted axes are trailing (the embedding) rather than leading, and `matmul`
    (one of `MATMULS`) how `qeinsum` multiplies by it (chosen per backend when a run is loaded)."""

    q: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    transposed: bool = struct.field(pytree_node=False, default=False)
    matmul: str = struct.field(pytree_node=False, default="dequant")

    @property
    def group_size(self) -> int:
        return self.q.shape[0] // self.scale.shape[0]


def contracted_size(shape: tuple[int, ...], contract: int, transposed: bool = False) -> int:
    """K: the product of the `contract` leading (or, `transposed`, trailing) axes of `shape`."""
    axes = shape[len(shape) - contract:] if transposed else shape[:contract]
    return int(np.prod(axes))


def as_matrix(w: jax.Array, contract: int, transposed: bool = False) -> jax.Array:
    """`w` as the [K, N] matrix that multiplies a flattened input."""
    if transposed:
        k = contracted_size(w.shape, contract, True)
        return w.reshape(-1, k).T
    return w.reshape(contracted_size(w.shape, contract), -1)


def from_matrix(m: jax.Array, shape: tuple[int, ...], transposed: bool = False) -> jax.Array:
    """Inverse of `as_matrix`."""
    return (m.T if transposed else m).reshape(shape)


def quantize(w: jax.Array, contract: int, bits: str = "int8", group_size: int = 0,
             transposed: bool = False) -> QArray:
    """Symmetric round-to-nearest quantization of `w` with its `contract` leading (trailing, `transposed`) axes
    contracted: one scale per output column and group of `group_size` contracted rows (0: the whole column).
    The scale is max|w| / levels over the group, so every weight rounds with error at most scale / 2."""
    levels = LEVELS[bits]
    m = as_matrix(jnp.asarray(w, jnp.float32), contract, transposed)
    k, n = m.shape
    group = group_size or k
    if k % group:
        raise ValueError(f"group size {group} does not divide the contracted size {k} of a {w.shape} weight")
    grouped = m.reshape(k // group, group, n)
    scale = jnp.max(jnp.abs(grouped), axis=1) / levels
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(grouped / scale[:, None]), -levels, levels).astype(jnp.int8).reshape(k, n)
    return QArray(q, scale.astype(jnp.float32), tuple(w.shape), transposed)


def dequantize_matrix(qa: QArray, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The [K, N] float matrix `qa` stands for."""
    k, n = qa.q.shape
    grouped = qa.q.reshape(qa.scale.shape[0], -1, n).astype(jnp.float32) * qa.scale[:, None]
    return grouped.reshape(k, n).astype(dtype)


def dequantize(qa: QArray, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The float weight (original shape) that `qa` stands for."""
    return from_matrix(dequantize_matrix(qa, dtype), qa.shape, qa.transposed)


def qdot(x: jax.Array, qa: QArray, dtype: jnp.dtype) -> jax.Array:
    """x [..., K] times the matrix of `qa` -> [..., N] float32, the way `qa.matmul` says (module docstring)."""
    if qa.matmul == "dequant":
        return jnp.einsum("...k,kn->...n", x.astype(dtype), dequantize_matrix(qa, dtype),
                          preferred_element_type=jnp.float32)
    if qa.matmul != "int8":
        raise ValueError(f"unknown quantized matmul {qa.matmul!r}; expected one of {MATMULS}")
    x = x.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
    x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
    xq = jnp.round(x / x_scale).astype(jnp.int8)
    groups, n = qa.scale.shape
    if groups == 1:
        acc = jnp.einsum("...k,kn->...n", xq, qa.q, preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * qa.scale[0] * x_scale
    xg = xq.reshape(*xq.shape[:-1], groups, -1)
    acc = jnp.einsum("...gk,gkn->...gn", xg, qa.q.reshape(groups, -1, n), preferred_element_type=jnp.int32)
    return jnp.einsum("...gn,gn->...n", acc.astype(jnp.float32), qa.scale) * x_scale


def qeinsum(equation: str, x: jax.Array, qa: QArray, dtype: jnp.dtype) -> jax.Array:
    """`einsum(equation, x, weight)` (float32 result) for a quantized weight, where x's trailing axes are the
    contracted ones, in the weight's order (every projection of lmjax and the output head)."""
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    contracted = [c for c in rhs if c in lhs and c not in out]
    n = len(contracted)
    kept = rhs[:-n] if qa.transposed else rhs[n:]
    if lhs[len(lhs) - n:] != "".join(contracted) or out != lhs[:len(lhs) - n] + kept:
        raise ValueError(f"qeinsum cannot compute {equation!r}: the input's trailing axes must be contracted")
    flat = x.reshape(*x.shape[:x.ndim - n], -1)
    kept_shape = qa.shape[:len(kept)] if qa.transposed else qa.shape[n:]
    return qdot(flat, qa, dtype).reshape(*x.shape[:x.ndim - n], *kept_shape)


def take_rows(qa: QArray, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `ids` of a quantized embedding table (stored transposed, [D, V]): [*ids.shape, D]."""
    if not qa.transposed:
        raise ValueError("take_rows needs an embedding stored transposed")
    q = jnp.take(qa.q, ids, axis=1)  # [D, *ids]
    scale = jnp.take(qa.scale, ids, axis=1)  # [G, *ids]
    rows = q.reshape(qa.scale.shape[0], -1, *ids.shape).astype(jnp.float32) * scale[:, None]
    return jnp.moveaxis(rows.reshape(-1, *ids.shape), 0, -1).astype(dtype)


# The weights that `quantize_params` quantizes, by the last key of their path, with how many of their leading
# axes a projection contracts. The tied embedding contracts its trailing axis (as the output head). Biases,
# norm scales and GPT-2's position table stay float32: they are small and not read by a matmul.
CONTRACTED = {"query": 1, "key": 1, "value": 1, "out": 2, "fc_in": 1, "fc_out": 1, "gate": 1, "up": 1, "down": 1,
              "lm_head": 1}


def quantize_params(params: dict, bits: str, group_size: int = 0, matmul: str = "dequant") -> dict:
    """`params` with every projection weight and the embedding / output head quantized (see `CONTRACTED`).
    Works on arrays or, under `jax.eval_shape`, on shapes (the abstract tree a checkpoint restores into)."""

    def convert(path: tuple, leaf):
        name = path[-1].key
        if name == "embed":
            return quantize(leaf, 1, bits, group_size, transposed=True).replace(matmul=matmul)
        if name in CONTRACTED:
            return quantize(leaf, CONTRACTED[name], bits, group_size).replace(matmul=matmul)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, params)


def with_matmul(params: dict, matmul: str) -> dict:
    """`params` with every `QArray` set to multiply the `matmul` way."""
    if matmul not in MATMULS:
        raise ValueError(f"unknown quantized matmul {matmul!r}; expected one of {MATMULS}")
    return jax.tree.map(lambda x: x.replace(matmul=matmul) if isinstance(x, QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QArray))
