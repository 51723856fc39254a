"""Parameters as plain pytrees: abstract shapes, logical axes, initialisation, counts and FLOPs.

The train step, checkpoints and the sampler work on a nested dict of arrays (`params`); the Flax
module structure lives in a `graphdef`, and `nnx.merge(graphdef, params)` rebuilds the model.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from ml_collections import ConfigDict

from lmjax.model.config import ModelConfig
from lmjax.model.lora import LoraWeight
from lmjax.model.quantized import QArray
from lmjax.model.transformer import Transformer

Params = dict[str, Any]


def abstract_model(cfg: ModelConfig | ConfigDict) -> tuple[nnx.GraphDef, Params, Params]:
    """(graphdef, params as ShapeDtypeStructs, logical axes per parameter); allocates nothing."""
    cfg = ModelConfig.from_config(cfg)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    shapes = traverse_util.unflatten_dict({path: var.get_value() for path, var in flat})
    axes = traverse_util.unflatten_dict({path: var.get_metadata()["axes"] for path, var in flat})
    return graphdef, shapes, axes


def init_params(cfg: ModelConfig | ConfigDict, rng: jax.Array) -> Params:
    """Fresh parameters for `cfg` from `rng` (jittable; put it under jit with out_shardings to shard)."""
    model = Transformer(ModelConfig.from_config(cfg), rngs=nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model))


def stack_layers(params: Params) -> Params:
    """Unrolled params (`blocks/{i}/...`, `model.scan_layers=False`) in the scanned layout: `blocks/...` with the
    layers stacked on a leading axis. Works on arrays or, under `jax.eval_shape`, on shapes."""
    blocks = params["blocks"]
    layers = [blocks[i] for i in range(len(blocks))]
    return {**params, "blocks": jax.tree.map(lambda *ws: jnp.stack(ws), *layers)}


def unstack_layers(params: Params) -> Params:
    """Scanned params (`blocks/...` [layers, ...]) in the unrolled layout `blocks/{i}/...`; inverse of
    `stack_layers`."""
    stacked = params["blocks"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "blocks": {i: jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(num_layers)}}


def count_params(params: Params) -> int:
    """Number of parameters (works on arrays or ShapeDtypeStructs; a quantized weight counts as the weight, a
    LoRA-adapted one as its base weight)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray | LoraWeight))
    return sum(math.prod(x.shape) for x in leaves)


def matmul_params(cfg: ModelConfig | ConfigDict, params: Params) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup and positions do not;
    the embedding does when it is tied to the output projection). The vocabulary's padding counts: the
    output matmul computes its columns too."""
    cfg = ModelConfig.from_config(cfg)
    n = count_params(params)
    if not cfg.tie_embeddings:
        n -= cfg.padded_vocab * cfg.d_model
    if cfg.arch.learned_positions:
        n -= cfg.seq_len * cfg.d_model
    return n


def flops_per_token(cfg: ModelConfig | ConfigDict, params: Params) -> float:
    """Training FLOPs per token: 6 x matmul params + 12 x layers x attention width x seq_len
    (forward + backward; attention scores counted without the causal halving, as in PaLM's MFU)."""
    cfg = ModelConfig.from_config(cfg)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * cfg.seq_len
    return 6 * matmul_params(cfg, params) + attention
