"""Quantized weights (symmetric int8 per output channel, int4 in groups along the contracted axis) and the
matmul that reads them.

A quantized weight is a `QArray` leaf in the params tree where the float array was; `nnx.merge` puts it in the
model's `nnx.Param` and `layers.project` (and the output head) multiply by it with `qeinsum`. It holds the matrix
that multiplies the input, flattened to [K contracted, N outputs] (the tied embedding [V, D] is stored as its
head [D, V]), with one float32 scale per group of `K // G` contracted rows and output: [G, N]. Int8 is the
case G = 1 with 127 levels; int4 has 7 levels and two values per byte (rows 2i and 2i+1 of a column share a
`uint8`, low and high nibble, offset by 8), so an int4 file is about half an int8 one.

`qeinsum` has two ways to multiply, `MATMULS`:
- "dequant": the weight is unpacked and scaled back to the compute dtype inside the jitted step, then
  multiplied as usual; exact to the rounding of the weights. On GPUs and TPUs XLA fuses this into the matmul,
  so only the quantized bytes are read from memory.
- "int8": each input row is rounded to int8 with its own scale (dynamic per-token quantization) and
  multiplied int8 x int8 -> int32, then scaled by both scales. XLA:CPU has no fused dequantizing matmul (it
  widens every weight to float32 at every step) but runs integer matmuls at up to twice float32's speed,
  so this is the fast path on CPUs; it adds the rounding of activations to that of the weights. It needs
  one scale per column: `for_matmul` turns int4 groups into int8 columns once, when a run is loaded
  (rounding each already-rounded weight once more, by at most half an int8 step), so on a CPU an int4 run
  decodes at int8's speed. XLA:CPU's integer matrix-vector product is ~20x slower than its matrix-matrix
  one, so a single input row is multiplied as two.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

MATMULS = ("dequant", "int8")
LEVELS = {"int8": 127, "int4": 7}  # largest magnitude of each format (symmetric: -L..L)


@struct.dataclass
class QArray:
    """A quantized weight: `q` [K, N] int8 (int4: [K / 2, N] uint8, two per byte), `scale` [G, N] float32;
    `shape` is the original weight's shape, `transposed` says its contracted axes are trailing (the embedding)
    rather than leading, and `matmul` (one of `MATMULS`) how `qeinsum` multiplies by it (set per backend by
    `for_matmul` when a run is loaded)."""

    q: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    transposed: bool = struct.field(pytree_node=False, default=False)
    bits: str = struct.field(pytree_node=False, default="int8")
    matmul: str = struct.field(pytree_node=False, default="dequant")

    @property
    def values(self) -> jax.Array:
        """The quantized values as int8 [K, N] (int4 unpacked)."""
        if self.bits == "int8":
            return self.q
        low = (self.q & 15).astype(jnp.int8) - 8
        high = (self.q >> 4).astype(jnp.int8) - 8
        return jnp.stack([low, high], axis=1).reshape(-1, self.q.shape[1])


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
    if k % group or (bits == "int4" and k % 2):
        raise ValueError(f"group size {group} does not divide the contracted size {k} of a {w.shape} weight "
                         "(or it is odd, for int4)")
    grouped = m.reshape(k // group, group, n)
    scale = jnp.max(jnp.abs(grouped), axis=1) / levels
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(grouped / scale[:, None]), -levels, levels).astype(jnp.int8).reshape(k, n)
    if bits == "int4":
        nibbles = (q + 8).astype(jnp.uint8).reshape(k // 2, 2, n)
        q = nibbles[:, 0] | (nibbles[:, 1] << 4)
    return QArray(q, scale.astype(jnp.float32), tuple(w.shape), transposed, bits)


def dequantize_matrix(qa: QArray, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The [K, N] float matrix `qa` stands for."""
    values = qa.values
    k, n = values.shape
    grouped = values.reshape(qa.scale.shape[0], -1, n).astype(jnp.float32) * qa.scale[:, None]
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
    if qa.bits != "int8" or qa.scale.shape[0] != 1:
        raise ValueError("the int8 matmul needs int8 weights with one scale per column (see for_matmul)")
    x = x.astype(jnp.float32)
    single = x.ndim == 1 or int(np.prod(x.shape[:-1])) == 1
    rows = jnp.concatenate([x.reshape(1, -1)] * 2) if single else x
    x_scale = jnp.max(jnp.abs(rows), axis=-1, keepdims=True) / 127
    x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
    xq = jnp.round(rows / x_scale).astype(jnp.int8)
    acc = jnp.einsum("...k,kn->...n", xq, qa.q, preferred_element_type=jnp.int32)
    out = acc.astype(jnp.float32) * qa.scale[0] * x_scale
    return out[:1].reshape(*x.shape[:-1], -1) if single else out


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
    q = jnp.take(qa.values, ids, axis=1)  # [D, *ids]
    scale = jnp.take(qa.scale, ids, axis=1)  # [G, *ids]
    rows = q.reshape(qa.scale.shape[0], -1, *ids.shape).astype(jnp.float32) * scale[:, None]
    return jnp.moveaxis(rows.reshape(-1, *ids.shape), 0, -1).astype(dtype)


# The weights that `quantize_params` quantizes, by the last key of their path, with how many of their leading
# axes a projection contracts. The tied embedding contracts its trailing axis (as the output head). Biases,
# norm scales and GPT-2's position table stay float32: they are small and not read by a matmul.
CONTRACTED = {"query": 1, "key": 1, "value": 1, "out": 2, "fc_in": 1, "fc_out": 1, "gate": 1, "up": 1, "down": 1,
              "lm_head": 1}


def quantize_params(params: dict, bits: str, group_size: int = 0) -> dict:
    """`params` with every projection weight and the embedding / output head quantized (see `CONTRACTED`).
    Works on arrays or, under `jax.eval_shape`, on shapes (the abstract tree a checkpoint restores into)."""

    def convert(path: tuple, leaf):
        name = path[-1].key
        if name == "embed":
            return quantize(leaf, 1, bits, group_size, transposed=True)
        if name in CONTRACTED:
            return quantize(leaf, CONTRACTED[name], bits, group_size)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, params)


def for_matmul(params: dict, matmul: str) -> dict:
    """`params` with every `QArray` set to multiply the `matmul` way; for "int8", int4 and grouped weights are
    requantized to int8 per column first (module docstring)."""
    if matmul not in MATMULS:
        raise ValueError(f"unknown quantized matmul {matmul!r}; expected one of {MATMULS}")

    def convert(qa):
        if not isinstance(qa, QArray):
            return qa
        if matmul == "int8" and (qa.bits != "int8" or qa.scale.shape[0] != 1):
            q = quantize(dequantize_matrix(qa), 1, "int8")
            qa = qa.replace(q=q.q, scale=q.scale, bits="int8")
        return qa.replace(matmul=matmul)

    return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, QArray))
