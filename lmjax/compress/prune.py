"""Pruning: zeroing the least important weights of every projection, by magnitude or by Wanda.

- magnitude: score |W|; the lowest-scoring weights of each matrix go (layer-wise, as in the Wanda paper's
  magnitude baseline).
- wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models"): score
  |W_kn| * ||X_k||_2, the weight times the norm of its input feature over calibration tokens; the
  lowest-scoring weights of each output column go (the paper's per-output comparison group).
- an N:M pattern (e.g. 2:4) keeps the N best-scoring weights of every M consecutive inputs of each output,
  with either score.

Only the transformer blocks' projection weights are pruned; the embedding, output head, biases and norms are
kept, as in the Wanda paper. Pruned weights are stored as zeros in the usual dense arrays: the model gets no
smaller and no faster on its own (sparse kernels are not used); with int8 the zeros stay exact zeros.
"""

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lmjax.model.layers import record_inputs
from lmjax.model.loss import Batch
from lmjax.model.params import Params, abstract_model
from lmjax.model.quantized import CONTRACTED, QArray, as_matrix, from_matrix

METHODS = ("magnitude", "wanda")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): keep N of every M."""
    try:
        keep, group = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < keep < group:
        raise ValueError(f"pattern {pattern!r} must keep between 1 and M - 1 of every M weights")
    return keep, group


def prunable(path: tuple) -> bool:
    """Whether the parameter at `path` is a block projection weight (what pruning touches)."""
    return path[0] == "blocks" and path[-1] in CONTRACTED


def input_norms(model_cfg: ConfigDict, params: Params, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
    """For every block projection, the L2 norm of each input feature over the tokens of `batches`
    ({"blocks/0/attn/query": [K]}), as Wanda needs. Padding tokens count too (few in packed batches)."""
    cfg = ConfigDict(model_cfg.to_dict())
    cfg.remat = "nothing"  # the recording hook cannot see through rematerialisation
    graphdef, _, _ = abstract_model(cfg)

    @jax.jit
    def sums(params: Params, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        with record_inputs() as recorded:
            model(batch["inputs"], batch["positions"], batch["segment_ids"])
        names = {id(node): "/".join(map(str, path)) for path, node in nnx.iter_graph(model)
                 if isinstance(node, nnx.Param)}
        return {names[key]: value.reshape(-1) for key, value in recorded.items()}

    total: dict[str, np.ndarray] = {}
    for batch in batches:
        for name, value in jax.device_get(sums(params, batch)).items():
            total[name] = total.get(name, 0) + value
    if not total:
        raise ValueError("no calibration batches")
    return {name: np.sqrt(value) for name, value in total.items() if name.startswith("blocks/")}


def prune_mask(score: np.ndarray, sparsity: float, pattern: str, per_output: bool) -> np.ndarray:
    """Keep-mask of a [K, N] score matrix: with `pattern` N:M the best N of every M consecutive rows of each
    column; otherwise without the lowest `sparsity` share of each column (`per_output`) or of the matrix."""
    k, n = score.shape
    if pattern:
        keep, group = parse_pattern(pattern)
        if k % group:
            raise ValueError(f"pattern {pattern} needs the input size ({k}) to be a multiple of {group}")
        grouped = score.reshape(k // group, group, n)
        ranks = np.argsort(np.argsort(grouped, axis=1, kind="stable"), axis=1, kind="stable")
        return (ranks >= group - keep).reshape(k, n)
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if per_output:
        drop = int(sparsity * k)
        ranks = np.argsort(np.argsort(score, axis=0, kind="stable"), axis=0, kind="stable")
        return ranks >= drop
    drop = int(sparsity * k * n)
    ranks = np.argsort(np.argsort(score.reshape(-1), kind="stable"), kind="stable").reshape(k, n)
    return ranks >= drop


def prune_params(params: Params, method: str, sparsity: float = 0.5, pattern: str = "",
                 norms: dict[str, np.ndarray] | None = None) -> Params:
    """`params` with the block projection weights pruned by `method` ("magnitude", or "wanda" with `norms`
    from `input_norms`) to `sparsity` (or to an N:M `pattern`)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS}")
    if method == "wanda" and norms is None:
        raise ValueError("Wanda needs input norms from calibration batches")

    def prune(path: tuple, leaf):
        keys = tuple(p.key for p in path)
        if not prunable(keys):
            return leaf
        w = np.asarray(jax.device_get(leaf))
        m = np.asarray(as_matrix(w, CONTRACTED[keys[-1]]))
        score = np.abs(m).astype(np.float32)
        if method == "wanda":
            score = score * norms["/".join(map(str, keys))][:, None]
        mask = prune_mask(score, sparsity, pattern, per_output=method == "wanda")
        return jnp.asarray(from_matrix(np.where(mask, m, 0).astype(w.dtype), w.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(prune, params)


def sparsity_of(params: Params) -> float:
    """The share of zeros among the block projection weights (after quantization, too)."""
    zeros = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]:
        keys = tuple(p.key for p in path)
        if prunable(keys):
            values = np.asarray(jax.device_get(leaf.values if isinstance(leaf, QArray) else leaf))
            zeros += int((values == 0).sum())
            total += values.size
    return zeros / max(total, 1)
