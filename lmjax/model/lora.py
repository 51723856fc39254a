"""LoRA (Hu et al. 2021): low-rank adapters on frozen projection weights.

A weight W with contracted axes K... and output axes N... (lmjax's projections keep heads as their own axes,
e.g. query [d_model, heads, head_dim], out [heads, head_dim, d_model]) gets two adapters laid out like it:
`a` [K..., r] and `b` [r, N...], and the projection becomes

    x W + (alpha / r) * (dropout(x) a) b

with `b` zero at the start (the adapted model is the base model) and `a` random. Training differentiates only
the adapters: the train state's `params` hold them alone, as a tree {path...: {"a", "b"}} that mirrors the
parameter tree, and `attach` puts them on the frozen base as `LoraWeight` leaves where the float weights were
(the way a `QArray` is); `layers.project` multiplies by a `LoraWeight` unmerged. `merge` folds the adapters
into plain float weights, for `lmjax lora merge` and export. The base may be held in bfloat16 or int8
(`frozen_base`) to save memory; the adapters stay in the run's parameter dtype.
"""

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from ml_collections import ConfigDict

from lmjax.config import ConfigError
from lmjax.model.config import MLP_WEIGHTS
from lmjax.model.quantized import CONTRACTED, QArray, dequantize, quantize_params

# The weights LoRA may adapt are the block projections (never the embedding, head or norms): attention's and
# those of the model's MLP kind (`MLP_WEIGHTS`), which the target "mlp" stands for.
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
RANK_AXIS = "lora_rank"  # logical axis of the adapters' rank dimension (replicated by the default rules)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The `train.lora.*` knobs (see lmjax/config.py)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    target_regex: str = ""
    base_dtype: str = ""

    @classmethod
    def from_config(cls, lora_cfg: ConfigDict) -> "LoraSpec":
        return cls(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, tuple(lora_cfg.targets), lora_cfg.target_regex,
                   lora_cfg.base_dtype)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, as PEFT scales (without rsLoRA)."""
        return self.alpha / self.rank


@struct.dataclass
class LoraWeight:
    """A frozen weight `w` (float, or a `QArray`) with adapters `a` [K..., r] and `b` [r, N...]; the projection
    adds `scale` x (x a) b, dropping inputs of the adapter path at rate `dropout` when `dropout_rng` is set."""

    w: Any
    a: jax.Array
    b: jax.Array
    dropout_rng: jax.Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self) -> tuple[int, ...]:
        """The base weight's shape."""
        return tuple(self.w.shape)


def lora_equations(equation: str) -> tuple[str, str]:
    """For a projection `equation` (lhs,rhs->out with the weight's contracted axes leading), the einsums
    x, a -> h and h, b -> out of its adapter path."""
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    contracted = "".join(c for c in rhs if c in lhs and c not in out)
    kept = rhs[len(contracted):]
    batch = "".join(c for c in lhs if c not in contracted)
    r = next(c for c in "rzyxwqpo" if c not in equation)
    return f"{lhs},{contracted}{r}->{batch}{r}", f"{batch}{r},{r}{kept}->{out}"


def _paths(params) -> Iterator[tuple[tuple, Any]]:
    """(path of keys, leaf) of every parameter (a `QArray` is one leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))
    for path, leaf in flat:
        yield tuple(k.key for k in path), leaf


def path_name(path: tuple) -> str:
    """'blocks/0/attn/query': the '/'-joined path that `target_regex` matches."""
    return "/".join(str(k) for k in path)


def target_paths(params, spec: LoraSpec, mlp: str) -> list[tuple]:
    """Paths of the weights `spec` adapts in a model with MLP kind `mlp` (resolved: gelu, swiglu or relu2):
    those named in `targets` ("mlp" = the MLP's projections) and those whose path `target_regex` matches in
    full. ConfigError for a target the model lacks, a regex that matches nothing or something other than a
    block projection, and for no target at all."""
    projections = ATTENTION_PROJECTIONS + MLP_WEIGHTS[mlp]
    names = set()
    for target in spec.targets:
        named = MLP_WEIGHTS[mlp] if target == "mlp" else (target,)
        missing = [n for n in named if n not in projections]
        if missing:
            raise ConfigError(f"train.lora.targets names {target!r}, which a model with the {mlp} MLP does not "
                              f"have; its projections: mlp, {', '.join(projections)}")
        names.update(named)
    regex = re.compile(spec.target_regex) if spec.target_regex else None
    chosen, matched = [], []
    for path, _ in _paths(params):
        is_projection = path[0] == "blocks" and path[-1] in projections
        if regex is not None and regex.fullmatch(path_name(path)):
            matched.append(path)
            if not is_projection:
                raise ConfigError(f"train.lora.target_regex {spec.target_regex!r} matches {path_name(path)}, "
                                  "which is not a block projection (LoRA adapts only those)")
        if is_projection and (path[-1] in names or path in matched):
            chosen.append(path)
    if regex is not None and not matched:
        raise ConfigError(f"train.lora.target_regex {spec.target_regex!r} matches no parameter; paths look like "
                          "blocks/0/attn/query, blocks/1/mlp/down")
    if not chosen:
        raise ConfigError("train.lora selects no weight: set train.lora.targets and/or train.lora.target_regex")
    return chosen


def _lookup(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def init_adapters(params, spec: LoraSpec, mlp: str, rng: jax.Array) -> dict:
    """Fresh adapters for the weights `spec` targets in `params` (arrays or shapes): `a` from N(0, 1/K) with K
    the contracted size (Kaiming-like: x a keeps x's scale), `b` zero; in each weight's dtype."""
    adapters = {}
    for i, path in enumerate(target_paths(params, spec, mlp)):
        w = _lookup(params, path)
        n = CONTRACTED[path[-1]]
        contracted, kept = tuple(w.shape[:n]), tuple(w.shape[n:])
        std = 1.0 / np.sqrt(np.prod(contracted))
        a = std * jax.random.normal(jax.random.fold_in(rng, i), (*contracted, spec.rank), w.dtype)
        adapters[path] = {"a": a, "b": jnp.zeros((spec.rank, *kept), w.dtype)}
    return traverse_util.unflatten_dict(adapters)


def adapter_axes(axes: dict, adapters: dict) -> dict:
    """Logical axes of `adapters`: `a` keeps its weight's contracted axes, `b` its output axes, and the rank
    axis is `RANK_AXIS`."""
    flat = {}
    for path, _ in _paths(adapters):
        weight, which = path[:-1], path[-1]
        w_axes, n = _lookup(axes, weight), CONTRACTED[weight[-1]]
        flat[path] = (*w_axes[:n], RANK_AXIS) if which == "a" else (RANK_AXIS, *w_axes[n:])
    return traverse_util.unflatten_dict(flat)


def attach(base, adapters: dict, spec: LoraSpec, rng: jax.Array | None = None):
    """The model's parameters: `base` with a `LoraWeight` wherever `adapters` has an entry. With `rng` (training)
    and a dropout rate, each adapted weight gets its own dropout key."""
    count = iter(range(1 << 30))

    def wrap(path, w):
        adapter = _lookup(adapters, tuple(k.key for k in path))
        if adapter is None:
            return w
        key = jax.random.fold_in(rng, next(count)) if rng is not None and spec.dropout > 0 else None
        return LoraWeight(w, adapter["a"], adapter["b"], key, spec.scale, spec.dropout)

    return jax.tree_util.tree_map_with_path(wrap, base, is_leaf=lambda x: isinstance(x, QArray))


def delta(lora: LoraWeight) -> jax.Array:
    """scale x a b in the base weight's shape (float32)."""
    a, b = lora.a.astype(jnp.float32), lora.b.astype(jnp.float32)
    return lora.scale * jnp.tensordot(a, b, axes=1)


def merge(params, dtype: jnp.dtype = jnp.float32, adapters: bool = True):
    """`params` with every `LoraWeight` folded into a plain weight W + scale x a b (or, without `adapters`, just
    its base W); quantized weights dequantized, every weight in `dtype`."""

    def fold(x):
        if isinstance(x, LoraWeight):
            w = fold(x.w).astype(jnp.float32)
            return (w + delta(x) if adapters else w).astype(dtype)
        return dequantize(x, dtype) if isinstance(x, QArray) else x.astype(dtype)

    return jax.tree.map(fold, params, is_leaf=lambda x: isinstance(x, LoraWeight | QArray))


def frozen_base(params, base_dtype: str):
    """The base weights as LoRA holds them: as they are (""), in bfloat16, or with the projections, embedding
    and head in int8 per output channel (the rest float; `QArray`s that multiply by dequantizing, so gradients
    reach the inputs)."""
    if base_dtype == "bfloat16":
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    if base_dtype == "int8":
        return quantize_params(params, "int8")
    return params
