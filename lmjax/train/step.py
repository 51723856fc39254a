"""Pure, jittable training steps.

A train state is a dict {'step', 'params', 'opt_state', 'rng'} of arrays (in a LoRA run `params` are the
adapters only, and the frozen base weights are a separate argument of the step). A batch is a dict of int32
arrays `inputs`, `targets`, `segment_ids`, `positions` (and optionally `loss_mask`); train batches carry
a leading micro-batch axis [grad_accum, micro_batch, seq_len], eval batches are [batch, seq_len].
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from lmjax.model.config import ModelConfig
from lmjax.model.lora import LoraSpec, attach, init_adapters
from lmjax.model.loss import Batch, loss_weights, token_losses
from lmjax.model.params import Params, init_params

State = dict[str, Any]


def init_state(model_cfg: ModelConfig | ConfigDict, tx: optax.GradientTransformation, seed: int) -> State:
    """Step 0 of a new model: random parameters, their optimizer state and the RNG that drives dropout."""
    param_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    return start_state(init_params(model_cfg, param_rng), tx, seed)


def start_state(params: Params, tx: optax.GradientTransformation, seed: int) -> State:
    """Step 0 from given parameters (fine-tuning): their fresh optimizer state and the dropout RNG."""
    _, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": dropout_rng}


def accumulated_update(state: State, batch: Batch, summed_loss: Callable, tx: optax.GradientTransformation,
                       count_key: str) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step over the micro-batches of `batch` (leading axis). `summed_loss(params, micro, rng)`
    returns (loss sum, dict of sums); the loss and the other sums are averaged over the total of
    `sums[count_key]`, so accumulation gives the same update as one big batch."""
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def accumulate(carry, xs):
        grads, loss, sums = carry
        micro, i = xs
        (m_loss, m_sums), m_grads = grad_fn(state["params"], micro, jax.random.fold_in(step_rng, i))
        return (jax.tree.map(jnp.add, grads, m_grads), loss + m_loss, jax.tree.map(jnp.add, sums, m_sums)), None

    num_micro = jax.tree.leaves(batch)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    sum_shapes = jax.eval_shape(summed_loss, state["params"], first, step_rng)[1]
    zeros = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.zeros(()),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(num_micro)))
    count = jnp.maximum(sums[count_key], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {k: v if k == count_key else v / count for k, v in sums.items()}
    return new_state, {"loss": loss / count, "grad_norm": optax.tree.norm(grads), **metrics}


def train_step(state: State, batch: Batch, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               dropout: bool) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step of next-token prediction; the loss is the mean over all counted tokens of the
    whole batch (see `accumulated_update`)."""
    return _lm_update(state, batch, graphdef, tx, dropout, lambda params, rng: params)


def init_lora_state(base: Params, lora: LoraSpec, family: str, tx: optax.GradientTransformation, seed: int) -> State:
    """Step 0 of a LoRA run: fresh adapters for the weights `lora` targets in `base` (arrays or shapes) as the
    trainable params, their optimizer state and the dropout RNG. The base itself is not part of the state."""
    adapter_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    return start_state(init_adapters(base, lora, family, adapter_rng), tx, seed)


def lora_train_step(state: State, base: Params, batch: Batch, *, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, dropout: bool,
                    lora: LoraSpec) -> tuple[State, dict[str, jax.Array]]:
    """`train_step` of a LoRA run: the state's params are the adapters, attached to the frozen `base`, which is
    neither differentiated nor in the optimizer state."""
    attached = lambda adapters, rng: attach(base, adapters, lora, jax.random.fold_in(rng, 1))
    return _lm_update(state, batch, graphdef, tx, dropout, attached)


def _lm_update(state: State, batch: Batch, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, dropout: bool,
               model_params: Callable) -> tuple[State, dict[str, jax.Array]]:
    """The next-token step on the model parameters `model_params(state params, rng)`."""

    def summed_loss(params, micro, rng):
        weights = loss_weights(micro)
        losses = token_losses(model_params(params, rng), graphdef, micro, rng if dropout else None)
        return (losses * weights).sum(), {"tokens": weights.sum()}

    return accumulated_update(state, batch, summed_loss, tx, count_key="tokens")
