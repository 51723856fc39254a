"""Pure, jittable training and evaluation steps.

A train state is a dict {'step', 'params', 'opt_state', 'rng'} of arrays. A batch is a dict of int32
arrays `inputs`, `targets`, `segment_ids`, `positions` (and optionally `loss_mask`); train batches carry
a leading micro-batch axis [grad_accum, micro_batch, seq_len], eval batches are [batch, seq_len].
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from lmjax.model.params import Params, init_params

State = dict[str, Any]
Batch = dict[str, jax.Array]


def init_state(model_cfg: ConfigDict, tx: optax.GradientTransformation, seed: int) -> State:
    """Step 0: fresh parameters, optimizer state and the RNG that drives dropout."""
    param_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(model_cfg, param_rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": dropout_rng}


def loss_weights(batch: Batch) -> jax.Array:
    """Which target positions count in the loss: `loss_mask` if given, else every non-padding token."""
    if "loss_mask" in batch:
        return batch["loss_mask"].astype(jnp.float32)
    return (batch["segment_ids"] != 0).astype(jnp.float32)


def token_losses(params: Params, graphdef: nnx.GraphDef, batch: Batch,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
    """Per-token next-token cross-entropy (nats, float32), shape [batch, seq_len]."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def train_step(state: State, batch: Batch, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               dropout: bool) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step over `grad_accum` micro-batches; the loss is the mean over all counted tokens
    of the whole batch, so accumulation gives the same update as one big batch."""
    step_rng = jax.random.fold_in(state["rng"], state["step"])

    def summed_loss(params, micro, rng):
        weights = loss_weights(micro)
        losses = token_losses(params, graphdef, micro, rng if dropout else None)
        return (losses * weights).sum(), weights.sum()

    def accumulate(carry, xs):
        grads, loss, count = carry
        micro, i = xs
        (m_loss, m_count), m_grads = jax.value_and_grad(summed_loss, has_aux=True)(
            state["params"], micro, jax.random.fold_in(step_rng, i))
        return (jax.tree.map(jnp.add, grads, m_grads), loss + m_loss, count + m_count), None

    num_micro = batch["inputs"].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (grads, loss, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), (batch, jnp.arange(num_micro)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {"loss": loss / count, "grad_norm": optax.tree.norm(grads), "tokens": count}
    return new_state, metrics


def eval_step(params: Params, batch: Batch, token_bytes: jax.Array, *,
              graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """Sums over one batch: loss (nats), counted tokens and the UTF-8 bytes those tokens decode to
    (for bits per byte, which does not depend on the tokenizer)."""
    weights = loss_weights(batch)
    losses = token_losses(params, graphdef, batch)
    return {
        "loss_sum": (losses * weights).sum(),
        "tokens": weights.sum(),
        "bytes": (token_bytes[batch["targets"]] * weights).sum(),
    }
