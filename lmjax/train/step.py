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
from lmjax.model.loss import Batch, batch_logits, loss_weights
from lmjax.model.params import Params, init_params
from lmjax.model.perturb import embedding_rms
from lmjax.train.adversarial import PLAIN, AdversarialSpec, adversarial_grads

State = dict[str, Any]


def init_state(model_cfg: ModelConfig | ConfigDict, tx: optax.GradientTransformation, seed: int) -> State:
    """Step 0 of a new model: random parameters, their optimizer state and the RNG that drives dropout."""
    param_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    return start_state(init_params(model_cfg, param_rng), tx, seed)


def start_state(params: Params, tx: optax.GradientTransformation, seed: int) -> State:
    """Step 0 from given parameters (fine-tuning): their fresh optimizer state and the dropout RNG."""
    _, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": dropout_rng}


def accumulated_update(state: State, batch: Batch, grad_fn: Callable, tx: optax.GradientTransformation,
                       count_key: str) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step over the micro-batches of `batch` (leading axis). `grad_fn(params, micro, rng)`
    returns ((loss sum, dict of sums), gradients of the loss sum), e.g. `jax.value_and_grad(summed_loss,
    has_aux=True)`; the loss, the gradients and the other sums are averaged over the total of
    `sums[count_key]`, so accumulation gives the same update as one big batch."""
    step_rng = jax.random.fold_in(state["rng"], state["step"])

    def accumulate(carry, xs):
        grads, loss, sums = carry
        micro, i = xs
        (m_loss, m_sums), m_grads = grad_fn(state["params"], micro, jax.random.fold_in(step_rng, i))
        return (jax.tree.map(jnp.add, grads, m_grads), loss + m_loss, jax.tree.map(jnp.add, sums, m_sums)), None

    num_micro = jax.tree.leaves(batch)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    sum_shapes = jax.eval_shape(grad_fn, state["params"], first, step_rng)[0][1]
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
               dropout: bool, adversarial: AdversarialSpec = PLAIN) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step of next-token prediction; the loss is the mean over all counted tokens of the
    whole batch (see `accumulated_update`), under `adversarial` training if enabled."""
    return _lm_update(state, batch, graphdef, tx, dropout, lambda params, rng: params, adversarial)


def init_lora_state(base: Params, lora: LoraSpec, mlp: str, tx: optax.GradientTransformation, seed: int) -> State:
    """Step 0 of a LoRA run: fresh adapters for the weights `lora` targets in `base` (arrays or shapes) as the
    trainable params, their optimizer state and the dropout RNG. The base itself is not part of the state."""
    adapter_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    return start_state(init_adapters(base, lora, mlp, adapter_rng), tx, seed)


def lora_train_step(state: State, base: Params, batch: Batch, *, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, dropout: bool,
                    lora: LoraSpec, adversarial: AdversarialSpec = PLAIN
                    ) -> tuple[State, dict[str, jax.Array]]:
    """`train_step` of a LoRA run: the state's params are the adapters, attached to the frozen `base`, which is
    neither differentiated nor in the optimizer state."""
    attached = lambda adapters, rng: attach(base, adapters, lora, jax.random.fold_in(rng, 1))
    return _lm_update(state, batch, graphdef, tx, dropout, attached, adversarial)


def _lm_update(state: State, batch: Batch, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, dropout: bool,
               model_params: Callable, adversarial: AdversarialSpec) -> tuple[State, dict[str, jax.Array]]:
    """The next-token step on the model parameters `model_params(state params, rng)`."""

    def grad_fn(params, micro, rng):
        weights = loss_weights(micro)
        logits_of = lambda p, delta: batch_logits(model_params(p, rng), graphdef, micro, rng if dropout else None,
                                                  delta)

        def objective(logits):
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, micro["targets"])
            return (losses * weights).sum(), {"tokens": weights.sum()}

        full = model_params(params, rng)
        scale = embedding_rms(full)
        return adversarial_grads(adversarial, logits_of, objective, params, micro, rng, scale,
                                 full["embed"].shape[-1], weights)

    return accumulated_update(state, batch, grad_fn, tx, count_key="tokens")
