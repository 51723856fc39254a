"""Perturbations of the input embeddings: NEFTune noise, random points and projected-gradient attacks in a ball.

Adversarial training (lmjax/train/adversarial.py) and the robustness evaluation (lmjax/eval/robust.py) share
these. A perturbation `delta` [B, T, D] (float32) is added to the token embeddings (`Transformer(embed_delta=)`);
`mask` [B, T] (bool) says which positions may move: real tokens, never padding.

Balls are per token and relative to the model's own scale. With r the root-mean-square L2 norm of the rows of
the embedding table (a property of the weights, not of the batch, so micro-batching changes nothing), an L2 ball
of radius eps holds ||delta_t|| <= eps * r at every position t, and an L-infinity ball holds
|delta_t,i| <= eps * r / sqrt(D) (the same radius at the cube's corners). So one eps means the same thing for a
5M-parameter model whose embeddings have norm 0.3 as for a 7B one. Ascent steps (alpha) are in the same units.
NEFTune's noise is absolute, as published: uniform in [-1, 1] times alpha / sqrt(L * D), L the
number of real tokens in the row.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lmjax.model.params import Params
from lmjax.model.quantized import QArray, take_rows

NORMS = ("l2", "linf")
_TINY = 1e-12


def embedding_rms(params: Params) -> jax.Array:
    """r: the root-mean-square L2 norm of the embedding table's rows (scalar, no gradient)."""
    table = params["embed"]
    if isinstance(table, QArray):
        table = take_rows(table, jnp.arange(table.shape[0]), jnp.float32)
    return jax.lax.stop_gradient(jnp.sqrt(jnp.square(table.astype(jnp.float32)).sum(-1).mean()))


def _per_coordinate(radius: jax.Array, dim: int) -> jax.Array:
    return radius / jnp.sqrt(jnp.float32(dim))


def project(delta: jax.Array, radius: jax.Array, norm: str, mask: jax.Array) -> jax.Array:
    """`delta` moved into the ball of `radius` (absolute) around 0, per position; 0 where `mask` is False."""
    if norm == "linf":
        bound = _per_coordinate(radius, delta.shape[-1])
        delta = jnp.clip(delta, -bound, bound)
    else:
        length = jnp.linalg.norm(delta, axis=-1, keepdims=True)
        delta = delta * jnp.minimum(1.0, radius / jnp.maximum(length, _TINY))
    return delta * mask[..., None]


def ascend(delta: jax.Array, grad: jax.Array, step: jax.Array, norm: str, mask: jax.Array) -> jax.Array:
    """One steepest-ascent step of length `step` (absolute) per position: along grad / ||grad|| (L2) or
    sign(grad) (L-infinity); positions whose gradient is 0 stay put."""
    if norm == "linf":
        move = jnp.sign(grad) * _per_coordinate(step, grad.shape[-1])
    else:
        length = jnp.linalg.norm(grad, axis=-1, keepdims=True)
        move = step * grad / jnp.maximum(length, _TINY)
    return delta + move * mask[..., None]


def random_start(rng: jax.Array, shape: tuple[int, ...], radius: jax.Array, mask: jax.Array) -> jax.Array:
    """A random point of the L-infinity cube inscribed in the L2 ball of `radius` (so inside both balls)."""
    bound = _per_coordinate(radius, shape[-1])
    return jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0) * bound * mask[..., None]


def random_on_sphere(rng: jax.Array, shape: tuple[int, ...], radius: jax.Array, norm: str,
                     mask: jax.Array) -> jax.Array:
    """A random perturbation on the ball's surface: a Gaussian direction scaled to `radius` per position (L2)
    or random signs times the per-coordinate bound (L-infinity). The random baseline of an attack."""
    if norm == "linf":
        move = jax.random.rademacher(rng, shape, jnp.float32) * _per_coordinate(radius, shape[-1])
    else:
        g = jax.random.normal(rng, shape, jnp.float32)
        move = radius * g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), _TINY)
    return move * mask[..., None]


def neftune_noise(rng: jax.Array, shape: tuple[int, ...], alpha: float, mask: jax.Array) -> jax.Array:
    """NEFTune (Jain et al. 2023): uniform noise in [-1, 1] scaled by alpha / sqrt(L * D), L the number of real
    tokens of each row (with packing: of the packed row)."""
    length = jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)[..., None]
    scale = alpha / jnp.sqrt(length * shape[-1])
    return jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0) * scale * mask[..., None]


def pgd_attack(loss_of: Callable[[jax.Array], jax.Array], start: jax.Array, radius: jax.Array, step: jax.Array,
               norm: str, mask: jax.Array, steps: int) -> jax.Array:
    """`steps` steps of projected gradient ascent on the scalar `loss_of(delta)` from `start` (Madry et al.
    2018); returns the last point, without gradient."""
    grad_of = jax.grad(loss_of)

    def body(_, delta):
        return project(ascend(delta, grad_of(delta), step, norm, mask), radius, norm, mask)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, project(start, radius, norm, mask)))
