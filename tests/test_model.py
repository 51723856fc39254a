"""The transformer: causality, segment isolation, logical axes, parameter counts and FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.config import base_config, load_config
from lmjax.model.params import abstract_model, count_params, flops_per_token, init_params


def small_model_cfg(family: str):
    m = base_config().model
    m.update(family=family, vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2 if family == "llama" else 0,
             d_model=32, d_ff=64, seq_len=32, dtype="float32", tie_embeddings=family == "gpt2")
    return m


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    cfg = small_model_cfg(request.param)
    graphdef, _, axes = abstract_model(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    forward = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg)[0])
    return cfg, params, axes, forward


def test_changing_a_future_token_never_changes_past_logits(model):
    cfg, params, _, forward = model
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    pos, seg = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.ones((2, 16), jnp.int32)
    a = forward(params, tokens, pos, seg)
    b = forward(params, tokens.at[:, 9].set((tokens[:, 9] + 1) % cfg.vocab_size), pos, seg)
    assert np.array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_packed_documents_do_not_attend_to_each_other(model):
    cfg, params, _, forward = model
    doc1 = jax.random.randint(jax.random.PRNGKey(2), (1, 10), 0, cfg.vocab_size)
    doc2 = jax.random.randint(jax.random.PRNGKey(3), (1, 6), 0, cfg.vocab_size)
    packed = jnp.concatenate([doc1, doc2], 1)
    pos = jnp.concatenate([jnp.arange(10), jnp.arange(6)])[None]
    seg = jnp.concatenate([jnp.ones(10, jnp.int32), 2 * jnp.ones(6, jnp.int32)])[None]
    together = forward(params, packed, pos, seg)
    alone = forward(params, doc2, jnp.arange(6)[None], jnp.ones((1, 6), jnp.int32))
    np.testing.assert_allclose(together[:, 10:], alone, atol=1e-5)


def test_every_parameter_has_logical_axes_of_its_rank(model):
    cfg, params, axes, _ = model
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    for path, value in flat_params:
        assert len(flat_axes[path]) == value.ndim, path
    names = {a for ax in flat_axes.values() for a in ax}
    assert {"embed", "vocab", "heads", "kv_heads", "mlp"} <= names


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = small_model_cfg("llama")
    cfg.dtype = "bfloat16"
    graphdef, shapes, _ = abstract_model(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    logits, _ = nnx.merge(graphdef, params)(tokens, jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("name, expected", [
    ("gpt2_small", 124_439_808),  # GPT-2 small with its 50257-token vocabulary
    ("llama_1b", 1_235_814_400),  # Llama 3.2 1B
    ("llama_7b", 6_738_415_616),  # Llama 2 7B
])
def test_parameter_counts_match_published_models(name, expected):
    cfg = load_config(f"configs/{name}.py").model
    _, shapes, _ = abstract_model(cfg)
    assert count_params(shapes) == expected


def test_flops_per_token_follows_6n_plus_attention():
    cfg = load_config("configs/gpt2_small.py").model
    _, shapes, _ = abstract_model(cfg)
    n_matmul = 124_439_808 - 1024 * 768  # the tied embedding is the output matmul; positions are a lookup
    assert flops_per_token(cfg, shapes) == 6 * n_matmul + 12 * 12 * 768 * 1024
