"""Per-token next-token cross-entropy and which tokens count: shared by training, DPO and evaluation.

A batch is a dict of int32 arrays `inputs`, `targets`, `segment_ids`, `positions` (and optionally
`loss_mask`), each [batch, seq_len].
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax.model.params import Params

Batch = dict[str, jax.Array]


def loss_weights(batch: Batch) -> jax.Array:
    """Which target positions count in the loss: `loss_mask` if given, else every non-padding token."""
    if "loss_mask" in batch:
        return batch["loss_mask"].astype(jnp.float32)
    return (batch["segment_ids"] != 0).astype(jnp.float32)


def batch_logits(params: Params, graphdef: nnx.GraphDef, batch: Batch, dropout_rng: jax.Array | None = None,
                 embed_delta: jax.Array | None = None) -> jax.Array:
    """Next-token logits [batch, seq_len, padded vocab] (float32) of a batch's inputs, with `embed_delta`
    added to the token embeddings if given."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=dropout_rng,
                      embed_delta=embed_delta)
    return logits


def token_losses(params: Params, graphdef: nnx.GraphDef, batch: Batch, dropout_rng: jax.Array | None = None,
                 embed_delta: jax.Array | None = None) -> jax.Array:
    """Per-token next-token cross-entropy (nats, float32), shape [batch, seq_len]."""
    logits = batch_logits(params, graphdef, batch, dropout_rng, embed_delta)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
