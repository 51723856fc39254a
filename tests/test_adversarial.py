"""Adversarial training (train.adversarial): the embedding-space balls, each method's step against the plain step,
gradient accumulation, exact resume, DPO and the config's refusals. Sharded runs: tests/test_sharding.py."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lmjax.config import ConfigError, validate
from lmjax.input.pairs import pair_batches, pair_chunks
from lmjax.model.lora import LoraSpec
from lmjax.model.loss import token_losses
from lmjax.model.params import abstract_model, init_params
from lmjax.model.perturb import (
    ascend,
    embedding_rms,
    neftune_noise,
    pgd_attack,
    project,
    random_on_sphere,
    random_start,
)
from lmjax.train.adversarial import AdversarialSpec, perturbable, symmetric_kl
from lmjax.train.dpo import dpo_step
from lmjax.train.loop import train
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_lora_state, init_state, lora_train_step, train_step

VOCAB, B, T, D = 512, 4, 16, 64


def _model():
    cfg = tiny_config("train.warmup_steps=0")  # the first step moves the weights
    cfg.model.vocab_size = VOCAB
    graphdef, _, _ = abstract_model(cfg.model)
    return cfg, graphdef


def _batch(accum: int = 1, micro: int = 8, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (accum, micro, length + 1)).astype(np.int32)
    seg = np.ones((accum, micro, length), np.int32)
    seg[..., length - 5:] = 0  # a padding tail: never perturbed, never counted
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), seg.shape).copy()}


def _norms(delta, norm):
    return jnp.abs(delta).max(-1) if norm == "linf" else jnp.linalg.norm(delta, axis=-1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_ascent_and_starts_stay_in_the_ball_and_off_padding(norm):
    rng = jax.random.PRNGKey(0)
    mask = jnp.ones((B, T), bool).at[:, -3:].set(False)
    radius = jnp.float32(0.5)
    bound = radius if norm == "l2" else radius / np.sqrt(D)
    big = 10 * jax.random.normal(rng, (B, T, D))
    inside = project(big, radius, norm, mask)
    assert float(_norms(inside, norm).max()) <= float(bound) * (1 + 1e-5)
    assert float(jnp.abs(inside[:, -3:]).max()) == 0.0
    small = 1e-3 * big
    np.testing.assert_allclose(project(small, radius, norm, mask)[:, :-3], small[:, :-3], rtol=1e-6)
    for start in (random_start(rng, (B, T, D), radius, mask), random_on_sphere(rng, (B, T, D), radius, norm, mask)):
        assert float(_norms(start, "l2").max()) <= float(radius) * (1 + 1e-5)
        assert float(jnp.abs(start[:, -3:]).max()) == 0.0
    surface = _norms(random_on_sphere(rng, (B, T, D), radius, norm, mask)[:, :-3], norm)
    np.testing.assert_allclose(surface, bound, rtol=1e-5)  # the random baseline sits on the surface
    step = ascend(jnp.zeros((B, T, D)), big, jnp.float32(0.1), norm, mask)
    np.testing.assert_allclose(_norms(step[:, :-3], norm), 0.1 if norm == "l2" else 0.1 / np.sqrt(D), rtol=1e-5)
    assert float(jnp.vdot(step, big)) > 0  # uphill


def test_neftune_noise_scales_with_alpha_over_sqrt_length_times_width():
    mask = jnp.ones((2, 100), bool).at[1, 25:].set(False)  # rows of 100 and 25 real tokens
    noise = neftune_noise(jax.random.PRNGKey(1), (2, 100, D), 5.0, mask)
    for row, length in ((0, 100), (1, 25)):
        bound = 5.0 / np.sqrt(length * D)
        assert float(jnp.abs(noise[row, :length]).max()) <= bound
        assert float(jnp.abs(noise[row, :length]).max()) > 0.95 * bound  # uniform over the whole range
    assert float(jnp.abs(noise[1, 25:]).max()) == 0.0


def test_pgd_attack_finds_higher_loss_than_random_points_of_the_same_ball():
    cfg, graphdef = _model()
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    batch = {k: v[0] for k, v in _batch().items()}
    mask = batch["segment_ids"] != 0
    radius = 0.5 * embedding_rms(params)
    loss_of = jax.jit(lambda d: token_losses(params, graphdef, batch, embed_delta=d)[mask].mean())
    shape = (*batch["inputs"].shape, cfg.model.d_model)
    clean = float(loss_of(jnp.zeros(shape)))
    randoms = [float(loss_of(random_on_sphere(jax.random.PRNGKey(i), shape, radius, "l2", mask))) for i in range(5)]
    delta = pgd_attack(loss_of, jnp.zeros(shape), radius, radius / 4, "l2", mask, steps=5)
    attacked = float(loss_of(delta))
    assert float(_norms(delta, "l2").max()) <= float(radius) * (1 + 1e-5)
    assert attacked > max(randoms) + 0.05 and attacked > clean + 0.05, (clean, randoms, attacked)


def test_scope_says_which_inputs_move():
    rows = {"segment_ids": jnp.array([[1, 1, 1, 1, 0]]), "loss_mask": jnp.array([[0, 0, 1, 1, 0]])}
    np.testing.assert_array_equal(perturbable(rows, "tokens"), [[True, True, True, True, False]])
    np.testing.assert_array_equal(perturbable(rows, "loss_mask"), [[False, False, True, True, False]])


def test_symmetric_kl_is_zero_on_equal_and_positive_on_different_logits():
    a = jax.random.normal(jax.random.PRNGKey(0), (3, 7))
    np.testing.assert_allclose(symmetric_kl(a, a), 0.0, atol=1e-6)
    b = a.at[:, 0].add(2.0)
    assert bool((symmetric_kl(a, b) > 0).all())
    np.testing.assert_allclose(symmetric_kl(a, b), symmetric_kl(b, a), rtol=1e-6)


def _step(spec: AdversarialSpec, cfg=None):
    cfg, graphdef = (cfg, abstract_model(cfg.model)[0]) if cfg else _model()
    tx = make_optimizer(cfg.train)
    return jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False, adversarial=spec)), \
        init_state(cfg.model, tx, 0)


def _assert_same_update(a, b, rtol=1e-5):
    """Equal loss and gradient norm, and equal weights after the step (Adam's first step is lr * sign(g) where
    |g| >> eps, so an entry whose gradient is ~eps may move a few lr-millionths differently)."""
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    for key in ("loss", "grad_norm"):
        assert float(metrics_a[key]) == pytest.approx(float(metrics_b[key]), rel=rtol), key
    for x, y in zip(jax.tree.leaves(state_a["params"]), jax.tree.leaves(state_b["params"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("spec", [AdversarialSpec("freelb", steps=1), AdversarialSpec("pgd", steps=2, weight=0.0),
                                  AdversarialSpec("smart", steps=1, weight=0.0)], ids=lambda s: s.method)
def test_methods_reduce_to_the_plain_step_at_zero_strength(spec):
    """FreeLB with one step from 0 is the plain gradient; PGD with weight 0 and SMART with weight 0 train on the
    clean loss only. A wiring mistake (the wrong delta, a missing average) breaks these equalities."""
    batch = _batch()
    plain, state = _step(AdversarialSpec())
    adversarial, _ = _step(spec)
    _assert_same_update(plain(state, batch), adversarial(state, batch))


@pytest.mark.parametrize("spec", [AdversarialSpec("neftune", alpha=5.0), AdversarialSpec("pgd", steps=2),
                                  AdversarialSpec("smart", eps=1.0)], ids=lambda s: s.method)
def test_each_method_changes_the_update_and_stays_finite(spec):
    batch = _batch()
    plain, state = _step(AdversarialSpec())
    adversarial, _ = _step(spec)
    (s_plain, m_plain), (s_adv, m_adv) = plain(state, batch), adversarial(state, batch)
    assert np.isfinite(float(m_adv["loss"])) and np.isfinite(float(m_adv["grad_norm"]))
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(s_plain["params"]),
                                                          jax.tree.leaves(s_adv["params"]), strict=True))
    assert diff > 1e-7, spec
    if spec.method == "pgd":  # trained on points of higher loss than the clean one
        assert float(m_adv["loss"]) > float(m_plain["loss"])


def test_gradient_accumulation_matches_one_big_batch():
    """Balls and ascent steps are per token (the scale comes from the weights), so splitting the batch into
    micro-batches gives the same update."""
    step, state = _step(AdversarialSpec("pgd", steps=2))
    big = _batch(1, 8, 32)
    split = {k: v.reshape(2, 4, 32) for k, v in big.items()}
    _assert_same_update(step(state, big), step(state, split), rtol=2e-5)


def _losses(workdir) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def test_adversarial_run_resumes_bit_identically(tmp_path):
    """SMART draws a random start in every micro-batch: 6 steps at once equal 3 steps then a resume to 6."""
    extra = ["train.adversarial.method=smart", "train.adversarial.steps=2", "train.decay=constant",
             "train.warmup_steps=2", "train.ckpt_every=100", "train.log_every=1", "train.eval_every=0",
             "train.samples="]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(*extra, "train.steps=6"), straight)
    train(tiny_config(*extra, "train.steps=3"), resumed)
    train(tiny_config(*extra, "train.steps=6"), resumed)
    assert _losses(straight) == _losses(resumed) and len(_losses(straight)) == 6
    train(tiny_config(*extra, "train.adversarial.method=none", "train.steps=1"), tmp_path / "plain")
    assert _losses(tmp_path / "plain")[0] != _losses(straight)[0]


def _pair_batch(tokenizer) -> dict[str, np.ndarray]:
    pairs = [{"prompt": [{"role": "user", "content": f"What is item {i}?"}],
              "chosen": f"Item {i} is a number, thank you.", "rejected": "No."} for i in range(8)]
    chunks, _ = pair_chunks(pairs, tokenizer, seq_len=64)
    return {k: v[None] for k, v in next(pair_batches(chunks, 64, 4, seed=0)).items()}


def test_dpo_with_neftune_and_smart(shared_tokenizer):
    cfg, graphdef = _model()
    tx = make_optimizer(cfg.train)
    state = init_state(cfg.model, tx, 0)
    batch = _pair_batch(shared_tokenizer)
    ref = state["params"]
    run = lambda spec: jax.jit(functools.partial(dpo_step, graphdef=graphdef, tx=tx, beta=0.1,
                                                 adversarial=spec))(state, ref, batch)
    plain = run(AdversarialSpec())
    _assert_same_update(plain, run(AdversarialSpec("smart", weight=0.0)))
    for spec in (AdversarialSpec("neftune", alpha=5.0), AdversarialSpec("smart", eps=1.0)):
        _, metrics = run(spec)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["pairs"]) == 4
        assert float(metrics["grad_norm"]) != pytest.approx(float(plain[1]["grad_norm"]), rel=1e-4), spec


@pytest.mark.parametrize("override, message", [
    ("train.adversarial.method=fgsm", "train.adversarial.method must be one of"),
    ("train.adversarial.norm=l1", "train.adversarial.norm must be l2|linf"),
    ("train.adversarial.steps=0", "steps must be >= 1"),
    ("train.adversarial.eps=0", "eps and alpha must be positive"),
    ("train.adversarial.scope=prompt", "scope must be tokens|loss_mask"),
])
def test_config_refuses_bad_adversarial_knobs(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(override))


def test_dpo_refuses_the_attack_methods():
    with pytest.raises(ConfigError, match="DPO supports neftune and smart"):
        validate(tiny_config("train.objective=dpo", "train.adversarial.method=pgd"))


def test_lora_step_attacks_the_adapted_model():
    """Under LoRA the attack and the ball use the frozen base's embeddings (the adapters have none)."""
    cfg, graphdef = _model()
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    spec = LoraSpec(rank=4, alpha=8.0, targets=("query", "value"))
    tx = make_optimizer(cfg.train)
    state = init_lora_state(params, spec, "swiglu", tx, seed=0)
    batch = _batch()
    run = lambda adv: jax.jit(functools.partial(lora_train_step, graphdef=graphdef, tx=tx, dropout=False, lora=spec,
                                                adversarial=adv))(state, params, batch)
    (_, plain), (_, attacked) = run(AdversarialSpec()), run(AdversarialSpec("pgd", steps=2, eps=0.5, alpha=0.25))
    assert np.isfinite(float(attacked["grad_norm"])) and float(attacked["grad_norm"]) > 0
    assert float(attacked["loss"]) > float(plain["loss"]) + 0.01


def test_smart_gradient_equals_differentiating_its_objective():
    """SMART reuses the clean forward pass through its VJP; the result must equal plain autodiff of
    clean loss + weight * KL(clean, perturbed) at the same perturbation."""
    from lmjax.model.loss import batch_logits
    from lmjax.train.adversarial import adversarial_grads

    cfg, graphdef = _model()
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    rows = {k: jnp.asarray(v[0]) for k, v in _batch().items()}
    weights = (rows["segment_ids"] != 0).astype(jnp.float32)
    logits_of = lambda p, d: batch_logits(p, graphdef, rows, None, d)

    def objective(logits):
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), rows["targets"][..., None], -1)[..., 0]
        return (losses * weights).sum(), {"tokens": weights.sum()}

    spec, rng, scale = AdversarialSpec("smart", eps=1.0, alpha=0.5, weight=2.0), jax.random.PRNGKey(3), jnp.float32(1)
    (value, _), grads = adversarial_grads(spec, logits_of, objective, params, rows, rng, scale, D, weights)
    # the same random start and attack as adversarial_grads draws, then the objective differentiated directly
    mask = rows["segment_ids"] != 0
    start = random_start(jax.random.split(jax.random.fold_in(rng, 2))[0], (*rows["inputs"].shape, D), 1.0, mask)
    clean = logits_of(params, None)
    delta = pgd_attack(lambda d: (symmetric_kl(clean, logits_of(params, d)) * weights).sum(), start, 1.0, 0.5,
                       "l2", mask, 1)
    direct = lambda p: objective(logits_of(p, None))[0] + 2.0 * (
        symmetric_kl(logits_of(p, None), logits_of(p, delta)) * weights).sum()
    expected_value, expected = jax.value_and_grad(direct)(params)
    assert float(value) == pytest.approx(float(expected_value), rel=1e-5)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
