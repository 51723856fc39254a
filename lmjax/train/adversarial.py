"""Adversarial training on the input embeddings (`train.adversarial`): NEFTune, PGD, FreeLB and SMART.

Each method turns a differentiable forward pass into (loss, gradients) for one micro-batch, inside the jitted
step (no host loop; K ascent steps are a `fori_loop`), so it works with every mesh, gradient accumulation and
exact resume: its randomness comes from the step's RNG. The balls, steps and noise are those of
lmjax/model/perturb.py: per token, relative to the RMS norm r of the embedding table's rows, real tokens only
(padding never moves).

- neftune (Jain et al. 2023): train on the loss with uniform noise alpha / sqrt(L * D) on the embeddings.
  Cost: one plain step.
- pgd (Madry et al. 2018): K steps of projected gradient ascent on the loss within the eps-ball (the parameters'
  gradients are not computed there), then train on (1 - weight) * clean + weight * adversarial loss
  (weight 1: Madry's objective). Cost: K ascent passes (forward + backward to the embeddings only) + one step,
  + one more when weight < 1.
- freelb (Zhu et al. 2020): K ascent steps whose backward passes also give the parameters' gradients, averaged
  over the K points; the ascent is "free". Cost: K steps.
- smart (Jiang et al. 2020): loss on clean inputs + weight * symmetric KL between the clean and the perturbed
  next-token distributions, the perturbation found by K ascent steps on that KL from a random start.
  Cost: K ascent passes and two steps (clean and perturbed; the attack reuses the clean forward pass).

Which positions count: the attack maximises the step's own objective (the loss-masked tokens in SFT, the DPO
loss in DPO) and SMART's KL is weighted like the loss. Which positions move is `scope`: "tokens" (the default)
perturbs every real input token, prompt included (in SFT, the prompt is what perturbed-prompt robustness is
about); "loss_mask" only the inputs whose next token counts in the loss (in SFT, the reply). Padding never
moves. Dropout, if on, uses the same mask in every pass of a micro-batch.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from lmjax.model.loss import Batch, loss_weights
from lmjax.model.params import Params
from lmjax.model.perturb import ascend, neftune_noise, pgd_attack, project, random_start

# (params, delta or None) -> logits [rows, T, V] of the step's forward batch
LogitsFn = Callable[[Params, jax.Array | None], jax.Array]
# logits -> (loss sum, dict of sums) of the step's objective
ObjectiveFn = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class AdversarialSpec(NamedTuple):
    """`train.adversarial` (see the config's comments)."""
    method: str = "none"
    eps: float = 0.1
    alpha: float = 0.03
    steps: int = 1
    norm: str = "l2"
    weight: float = 1.0
    init: str = "zero"
    scope: str = "tokens"

    @classmethod
    def from_config(cls, c: ConfigDict) -> "AdversarialSpec":
        return cls(c.method, float(c.eps), float(c.alpha), int(c.steps), c.norm, float(c.weight), c.init, c.scope)

    @property
    def enabled(self) -> bool:
        return self.method != "none"


PLAIN = AdversarialSpec()  # no adversarial training


def perturbable(rows: Batch, scope: str) -> jax.Array:
    """[rows, T] bool: the input positions that may move. "tokens": every real token; "loss_mask": only those
    whose next token counts in the loss (in SFT, the reply's inputs; the prompt stays clean)."""
    real = rows["segment_ids"] != 0
    return real & (loss_weights(rows) > 0) if scope == "loss_mask" else real


def symmetric_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(p||q) + KL(q||p) per position, from two logits arrays [..., V]."""
    log_p, log_q = jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
    return ((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q)).sum(-1)


def adversarial_grads(spec: AdversarialSpec, logits_of: LogitsFn, objective: ObjectiveFn, params: Params,
                      rows: Batch, rng: jax.Array, scale: jax.Array, d_model: int,
                      kl_weights: jax.Array) -> tuple[tuple[jax.Array, dict], Params]:
    """((loss sum, sums), gradients w.r.t. `params`) of one micro-batch under `spec.method`.

    `rows` is the [rows, T] batch the model sees (`perturbable` says which of its positions may move),
    `scale` the embeddings' RMS norm r, and `kl_weights` [rows, T] how SMART's KL counts per position (on the
    scale of the objective's loss sum)."""
    mask = perturbable(rows, spec.scope)
    shape = (*rows["inputs"].shape, d_model)
    radius, step = spec.eps * scale, spec.alpha * scale
    loss_at = lambda p, delta: objective(logits_of(p, delta))
    start_rng, noise_rng = jax.random.split(jax.random.fold_in(rng, 2))
    random = spec.init == "random" or spec.method == "smart"  # SMART's KL has no gradient at delta = 0
    start = random_start(start_rng, shape, radius, mask) if random else jnp.zeros(shape, jnp.float32)

    if spec.method == "none":
        return jax.value_and_grad(loss_at, has_aux=True)(params, None)
    if spec.method == "neftune":
        return jax.value_and_grad(loss_at, has_aux=True)(params, neftune_noise(noise_rng, shape, spec.alpha, mask))
    if spec.method == "pgd":
        delta = pgd_attack(lambda d: loss_at(params, d)[0], start, radius, step, spec.norm, mask, spec.steps)

        def mixed(p):
            adv, sums = loss_at(p, delta)
            if spec.weight == 1.0:
                return adv, sums
            return (1.0 - spec.weight) * loss_at(p, None)[0] + spec.weight * adv, sums

        return jax.value_and_grad(mixed, has_aux=True)(params)
    if spec.method == "freelb":
        return _freelb(spec, loss_at, params, project(start, radius, spec.norm, mask), radius, step, mask)
    if spec.method == "smart":
        return _smart(spec, logits_of, objective, params, start, radius, step, mask, kl_weights)
    raise ValueError(f"unknown adversarial method {spec.method!r}")


def _freelb(spec, loss_at, params, start, radius, step, mask):
    """Gradients of the parameters averaged over the K points of the ascent, each from the pass that also
    gives the perturbation's gradient."""
    grad_fn = jax.value_and_grad(loss_at, argnums=(0, 1), has_aux=True)
    (_, sums_shape), _ = jax.eval_shape(grad_fn, params, start)

    def body(_, carry):
        delta, loss, sums, grads = carry
        (k_loss, k_sums), (k_grads, g_delta) = grad_fn(params, delta)
        delta = project(ascend(delta, g_delta, step, spec.norm, mask), radius, spec.norm, mask)
        return (delta, loss + k_loss, jax.tree.map(jnp.add, sums, k_sums), jax.tree.map(jnp.add, grads, k_grads))

    zeros = (start, jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
             jax.tree.map(jnp.zeros_like, params))
    _, loss, sums, grads = jax.lax.fori_loop(0, spec.steps, body, zeros)
    k = float(spec.steps)
    return (loss / k, jax.tree.map(lambda s: s / k, sums)), jax.tree.map(lambda g: g / k, grads)


def _smart(spec, logits_of, objective, params, start, radius, step, mask, kl_weights):
    """Clean loss + weight * symmetric KL(clean, perturbed), the perturbation by ascent on that KL. The clean
    forward pass is run once: its logits serve the attack (as constants) and the objective (through its VJP)."""
    clean, clean_vjp = jax.vjp(lambda p: logits_of(p, None), params)
    fixed = jax.lax.stop_gradient(clean)
    divergence = lambda d: (symmetric_kl(fixed, logits_of(params, d)) * kl_weights).sum()
    delta = pgd_attack(divergence, start, radius, step, spec.norm, mask, spec.steps)

    def regularised(logits, p):
        loss, sums = objective(logits)
        return loss + spec.weight * (symmetric_kl(logits, logits_of(p, delta)) * kl_weights).sum(), sums

    value, (g_logits, g_params) = jax.value_and_grad(regularised, argnums=(0, 1), has_aux=True)(clean, params)
    return value, jax.tree.map(jnp.add, g_params, clean_vjp(g_logits)[0])
