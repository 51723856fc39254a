"""Direct preference optimisation (DPO, Rafailov et al. 2023) against a frozen reference model.

With the log-ratio margin m = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)),
the loss is -log sigmoid(beta * m), plus, with `nll` > 0, nll times the chosen reply's mean token negative
log-likelihood (RPO, Pang et al. 2024: it keeps the chosen replies likely, where plain DPO can lower both
sides and drift into gibberish when the rejected replies are far from what the policy writes). A pair counts
as ranked correctly when m > 0 and as half right on a tie (m == 0, e.g. at step 0 where the policy is the
reference), so preference accuracy starts at 0.5. Batches of pairs come from lmjax/input/pairs.py. DPO runs
without dropout.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmjax.input.pairs import SIDES
from lmjax.model.loss import Batch, batch_logits, loss_weights, token_losses
from lmjax.model.params import Params
from lmjax.model.perturb import embedding_rms
from lmjax.train.adversarial import PLAIN, AdversarialSpec, adversarial_grads
from lmjax.train.step import State, accumulated_update


def sequence_logprobs(params: Params, graphdef: nnx.GraphDef, batch: Batch) -> jax.Array:
    """Sum of the log-probabilities of the target tokens where loss_mask is 1, shape [batch]."""
    return -(token_losses(params, graphdef, batch) * loss_weights(batch)).sum(-1)


def _stack_sides(batch: Batch) -> Batch:
    """Both sides of each pair in adjacent rows ([B, 2, T] -> [2B, T]), so each device keeps its own pairs'
    rows on a sharded batch and one forward pass scores both."""
    return {k: jnp.stack([batch[f"{s}_{k}"] for s in SIDES], axis=1).reshape(-1, batch[f"chosen_{k}"].shape[-1])
            for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}


def _side_logprobs(logits: jax.Array, rows: Batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) sequence log-probs from the logits of the stacked rows."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
    logprobs = -(losses * loss_weights(rows)).sum(-1).reshape(-1, 2)
    return logprobs[:, 0], logprobs[:, 1]


def _pair_logprobs(params: Params, graphdef: nnx.GraphDef, rows: Batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) sequence log-probs of `params` on the stacked rows of a batch of pairs."""
    return tuple(sequence_logprobs(params, graphdef, rows).reshape(-1, 2).T)


def _chosen_tokens(rows: Batch) -> jax.Array:
    """Scored tokens of each pair's chosen reply, from the stacked rows, shape [pairs]."""
    return loss_weights(rows).sum(-1).reshape(-1, 2)[:, 0]


def pair_terms(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
               ref_rejected: jax.Array, beta: float, nll: float = 0.0,
               chosen_tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per pair: (loss, correctly ranked: 1, 0, or 0.5 on a tie, log-ratio margin); the loss is DPO's, plus
    `nll` times the chosen reply's mean token NLL (`chosen_tokens` scored tokens) when `nll` > 0."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    correct = (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)
    loss = -jax.nn.log_sigmoid(beta * margin)
    if nll:
        loss = loss - nll * policy_chosen / jnp.maximum(chosen_tokens, 1.0)
    return loss, correct, margin


def _pair_weights(batch: Batch) -> jax.Array:
    """1 for real pairs, 0 for the padding pairs of a batch."""
    return (batch["chosen_loss_mask"].sum(-1) > 0).astype(jnp.float32)


def _sums_from(chosen: jax.Array, rejected: jax.Array, ref: tuple[jax.Array, jax.Array], weights: jax.Array,
               beta: float, nll: float, chosen_tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss sum, {pairs, accuracy, margin} sums) over the real pairs."""
    loss, correct, margin = pair_terms(chosen, rejected, *ref, beta, nll, chosen_tokens)
    return (loss * weights).sum(), {"pairs": weights.sum(), "accuracy": (correct * weights).sum(),
                                    "margin": (margin * weights).sum()}


def _pair_sums(params: Params, ref_params: Params, batch: Batch, graphdef: nnx.GraphDef,
               beta: float, nll: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss sum, {pairs, accuracy, margin} sums) over the real (non-padding) pairs of a batch."""
    rows = _stack_sides(batch)
    ref = jax.lax.stop_gradient(_pair_logprobs(ref_params, graphdef, rows))
    return _sums_from(*_pair_logprobs(params, graphdef, rows), ref, _pair_weights(batch), beta, nll,
                      _chosen_tokens(rows))


def dpo_step(state: State, ref_params: Params, batch: Batch, *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, beta: float, nll: float = 0.0,
             adversarial: AdversarialSpec = PLAIN) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step of DPO over `grad_accum` micro-batches of pairs (leading axis); metrics are
    means over the step's pairs. Under `adversarial` (neftune or smart) the policy's inputs are perturbed
    (the reference's never); SMART's KL counts each side's loss-masked tokens as its mean per pair."""

    def grad_fn(params, micro, rng):
        rows, weights = _stack_sides(micro), _pair_weights(micro)
        ref = jax.lax.stop_gradient(_side_logprobs(batch_logits(ref_params, graphdef, rows), rows))
        logits_of = lambda p, delta: batch_logits(p, graphdef, rows, None, delta)
        objective = lambda logits: _sums_from(*_side_logprobs(logits, rows), ref, weights, beta, nll,
                                              _chosen_tokens(rows))
        mask = loss_weights(rows)
        per_pair = mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0) * jnp.repeat(weights, 2)[:, None] / 2
        scale = embedding_rms(params)
        return adversarial_grads(adversarial, logits_of, objective, params, rows, rng, scale,
                                 params["embed"].shape[-1], per_pair)

    return accumulated_update(state, batch, grad_fn, tx, count_key="pairs")


def dpo_eval_step(params: Params, ref_params: Params, batch: Batch, *, graphdef: nnx.GraphDef,
                  beta: float, nll: float = 0.0) -> dict[str, jax.Array]:
    """Sums over one batch of held-out pairs: loss, pairs, correctly ranked pairs and margins."""
    loss, sums = _pair_sums(params, ref_params, batch, graphdef, beta, nll)
    return {"loss": loss, **sums}


def evaluate_pairs(eval_fn, params: Params, ref_params: Params, batches) -> dict[str, float]:
    """Mean DPO loss, preference accuracy and log-ratio margin of `eval_fn` (a `dpo_eval_step`) over batches."""
    sums = None
    for batch in batches:
        out = eval_fn(params, ref_params, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["pairs"]), 1.0)
    return {f"val_{k}": float(sums[k]) / n for k in ("loss", "accuracy", "margin")}
