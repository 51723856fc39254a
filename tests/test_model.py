"""The transformer: typed config, causality, segment isolation, logical axes, vocabulary padding,
parameter counts and FLOPs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmjax.config import ConfigError, base_config, load_config, validate
from lmjax.model.config import ModelConfig
from lmjax.model.layers import head_logits, project
from lmjax.model.loss import token_losses
from lmjax.model.params import abstract_model, count_params, flops_per_token, init_params
from lmjax.model.transformer import MASKED_LOGIT, init_cache

BF16_EPS = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits): the relative error of one rounding


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


def test_logits_at_one_position_per_row_equal_those_of_the_full_forward(model):
    """What a prefill asks for: only the logits after each prompt's last token, the [B, T, V] never built."""
    cfg, params, _, forward = model
    graphdef, _, _ = abstract_model(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 16), 0, cfg.vocab_size)
    pos, seg = jnp.broadcast_to(jnp.arange(16), (3, 16)), jnp.ones((3, 16), jnp.int32)
    at = jnp.array([15, 0, 6])
    picked, _ = nnx.merge(graphdef, params)(tokens, pos, seg, logits_at=at)
    full = forward(params, tokens, pos, seg)
    assert picked.shape == (3, 1, full.shape[2])
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(3), at], rtol=1e-5, atol=1e-5)


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


def test_bfloat16_compute_keeps_float32_params_and_gives_float32_logits_within_rounding(model):
    cfg, params, _, forward = model
    cfg = cfg.copy_and_resolve_references()
    cfg.dtype = "bfloat16"
    graphdef, shapes, _ = abstract_model(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, cfg.vocab_size)
    pos, seg = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.ones((2, 16), jnp.int32)
    logits = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg)[0])(params, tokens, pos, seg)
    assert logits.dtype == jnp.float32
    logits, exact = np.asarray(logits)[..., :cfg.vocab_size], np.asarray(forward(params, tokens, pos, seg))
    exact = exact[..., :cfg.vocab_size]
    # Activations are rounded to bfloat16 in every layer: a few roundings of the logits' scale, no more.
    np.testing.assert_allclose(logits, exact, rtol=0, atol=4 * BF16_EPS * np.abs(exact).max())
    assert not np.array_equal(logits, exact)  # the compute really was bfloat16


# Every equation the model projects with (layers.py, attention.py), on sizes that tell each axis apart.
EQUATIONS = ("btd,df->btf", "btf,fd->btd", "btd,dhk->bthk", "bthk,hkd->btd")
AXIS_SIZES = {"b": 2, "t": 3, "d": 5, "f": 7, "h": 4, "k": 6}


def _projection_inputs(equation: str) -> tuple[np.ndarray, ...]:
    """Random float32 (x, w, bias, output cotangent) for `equation`."""
    inputs, out = equation.split("->")
    rng = np.random.default_rng(len(equation))
    return tuple(rng.standard_normal(tuple(AXIS_SIZES[a] for a in axes), np.float32)
                 for axes in (*inputs.split(","), out[-1], out))


def _dot_operand_dtypes(jaxpr) -> list[tuple[jnp.dtype, ...]]:
    """Operand dtypes of every dot_general in `jaxpr`, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval.dtype for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_operand_dtypes(inner)
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("equation", EQUATIONS)
def test_projection_gradients_match_autodiff_of_the_plain_einsum(equation, dtype):
    """`project`'s custom VJP (`_einsum_f32`, whose backward einsums are built by parsing the equation)
    against JAX's own differentiation of the same float32-accumulating einsum, rounded to `dtype`."""
    dtype = jnp.dtype(dtype)
    x, w, bias, cotangent = _projection_inputs(equation)

    def custom(x, w, bias):
        return (project(x, nnx.Param(w), equation, dtype, nnx.Param(bias)).astype(jnp.float32) * cotangent).sum()

    def plain(x, w, bias):
        out = jnp.einsum(equation, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32) + bias
        return (out.astype(dtype).astype(jnp.float32) * cotangent).sum()

    grads = jax.jit(jax.grad(custom, argnums=(0, 1, 2)))(x, w, bias)
    expected = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(x, w, bias)
    for name, got, want in zip(("x", "w", "bias"), grads, expected, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        # float32: the same sums in another order. bfloat16: both round exact products' float32 sums to
        # bfloat16, so at most one rounding apart.
        rtol = 1e-6 if dtype == jnp.float32 else BF16_EPS
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6, err_msg=name)
    if dtype == jnp.bfloat16:  # the point of the custom VJP: backward matmuls stay in bfloat16 too
        operands = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(custom, argnums=(0, 1)))(x, w, bias).jaxpr)
        assert len(operands) == 3 and set(operands) == {(dtype, dtype)}, operands


@pytest.mark.parametrize("equation", ["btd,vd->btv", "btd,dv->btv"])  # tied (embedding) and untied head
def test_the_heads_backward_multiplies_in_the_compute_dtype(equation):
    """In bfloat16 the head's backward matmuls take bfloat16 operands (its float32 logits' gradient rounded once,
    as PyTorch's autocast does), not the float32 ones autodiff of a float32-accumulating einsum would give; the
    gradients stay within a rounding or two of that autodiff. In float32 they equal it."""
    sizes = {"b": 2, "t": 3, "d": 8, "v": 11}
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal([sizes[a] for a in axes], np.float32) for axes in equation.split("->")[0].split(","))
    targets = jnp.asarray(rng.integers(0, sizes["v"], (2, 3)))
    for dtype in (jnp.dtype("float32"), jnp.dtype("bfloat16")):
        def loss(x, w, logits_of):
            return optax.softmax_cross_entropy_with_integer_labels(logits_of(x, w), targets).mean()

        ours = lambda x, w, dtype=dtype: head_logits(x.astype(dtype), nnx.Param(w), equation, dtype)
        plain = lambda x, w, dtype=dtype: jnp.einsum(equation, x.astype(dtype), w.astype(dtype),
                                                     preferred_element_type=jnp.float32)
        got = jax.grad(loss, argnums=(0, 1))(x, w, ours)
        want = jax.grad(loss, argnums=(0, 1))(x, w, plain)
        for g, e in zip(got, want, strict=True):  # bfloat16: the rounded cotangent's error, summed over the vocabulary
            scale = 1e-6 if dtype == jnp.float32 else 2 * BF16_EPS * float(np.abs(e).max())
            np.testing.assert_allclose(g, e, rtol=0, atol=scale)
        operands = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
            x, w, ours).jaxpr)
        assert len(operands) == 3 and set(operands) == {(dtype, dtype)}, operands


def test_model_config_has_every_model_knob_resolved_and_is_a_static_jit_argument():
    knobs = base_config().model
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(knobs.keys())
    knobs.update(num_heads=8, num_kv_heads=0, head_dim=0, d_model=256)
    cfg = ModelConfig.from_config(knobs)
    assert (cfg.num_kv_heads, cfg.head_dim) == (8, 32)
    assert ModelConfig.from_config(cfg) is cfg
    knobs.update(num_kv_heads=2, head_dim=64)
    assert (ModelConfig.from_config(knobs).num_kv_heads, ModelConfig.from_config(knobs).head_dim) == (2, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
    same = base_config().model
    same.update(num_heads=8, d_model=256)
    assert ModelConfig.from_config(same) == cfg and hash(ModelConfig.from_config(same)) == hash(cfg)
    cache = jax.jit(init_cache, static_argnums=(0, 1, 2))(cfg, 2, 16)
    assert cache["layers"][0]["k"].shape == (2, 16, 8, 32) and len(cache["layers"]) == cfg.num_layers


def test_vocab_multiple_is_validated():
    cfg = base_config()
    cfg.model.vocab_multiple = 0
    with pytest.raises(ConfigError, match="model.vocab_multiple must be positive"):
        validate(cfg)


@pytest.mark.parametrize("multiple, padded", [(128, 128), (1, 97), (32, 128), (97, 97), (50, 100)])
def test_vocabulary_is_padded_to_a_multiple(multiple, padded):
    cfg = small_model_cfg("llama")
    cfg.vocab_multiple = multiple
    _, shapes, axes = abstract_model(cfg)
    assert shapes["embed"].shape == (padded, 32) and shapes["lm_head"].shape == (32, padded)
    assert axes["embed"] == ("vocab", "embed") and axes["lm_head"] == ("embed", "vocab")


def test_padding_logits_are_masked_and_never_get_probability(model):
    cfg, params, _, forward = model
    assert params["embed"].shape[0] == 128 and cfg.vocab_size == 97
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, cfg.vocab_size)
    logits = forward(params, tokens, jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.ones((2, 16), jnp.int32))
    assert logits.shape == (2, 16, 128) and logits.dtype == jnp.float32
    assert bool((logits[..., 97:] == MASKED_LOGIT).all()) and bool((logits[..., :97] > MASKED_LOGIT / 2).all())
    for temperature in (1.0, 100.0):
        probs = jax.nn.softmax(logits / temperature, axis=-1)
        assert float(probs[..., 97:].max()) == 0.0
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_loss_and_gradients_equal_the_unpadded_model(family):
    """The same weights with and without padding rows: equal losses, equal gradients on the real vocabulary,
    and no gradient at all for the padding rows / columns."""
    padded_cfg = small_model_cfg(family)
    unpadded_cfg = small_model_cfg(family)
    unpadded_cfg.vocab_multiple = 1
    params = init_params(padded_cfg, jax.random.PRNGKey(0))
    trimmed = {**params, "embed": params["embed"][:97]}
    if "lm_head" in params:
        trimmed["lm_head"] = params["lm_head"][:, :97]
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 17), 0, 97)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones((2, 16), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}

    def loss(cfg, p):
        return token_losses(p, abstract_model(cfg)[0], batch).mean()

    padded_loss, padded_grads = jax.value_and_grad(functools.partial(loss, padded_cfg))(params)
    unpadded_loss, unpadded_grads = jax.value_and_grad(functools.partial(loss, unpadded_cfg))(trimmed)
    assert float(padded_loss) == pytest.approx(float(unpadded_loss), rel=1e-6)
    logits = nnx.merge(abstract_model(padded_cfg)[0], params)(batch["inputs"], batch["positions"],
                                                             batch["segment_ids"])[0]
    direct = optax.softmax_cross_entropy_with_integer_labels(logits[..., :97], batch["targets"]).mean()
    assert float(padded_loss) == pytest.approx(float(direct), rel=1e-6)
    assert not bool(padded_grads["embed"][97:].any())
    np.testing.assert_allclose(padded_grads["embed"][:97], unpadded_grads["embed"], atol=1e-6)
    if "lm_head" in params:
        assert not bool(padded_grads["lm_head"][:, 97:].any())
        np.testing.assert_allclose(padded_grads["lm_head"][:, :97], unpadded_grads["lm_head"], atol=1e-6)


@pytest.mark.parametrize("name, expected", [
    ("gpt2_small", 124_439_808),  # GPT-2 small with its 50257-token vocabulary
    ("llama_1b", 1_235_814_400),  # Llama 3.2 1B
    ("llama_7b", 6_738_415_616),  # Llama 2 7B
])
def test_parameter_counts_match_published_models(name, expected):
    cfg = load_config(f"configs/{name}.py").model
    cfg.vocab_multiple = 1  # the published counts are of unpadded vocabularies
    _, shapes, _ = abstract_model(cfg)
    assert count_params(shapes) == expected


def test_padded_vocabulary_adds_its_rows_to_the_count():
    cfg = load_config("configs/gpt2_small.py").model
    _, shapes, _ = abstract_model(cfg)
    assert shapes["embed"].shape == (50304, 768)  # 50257 rounded up to a multiple of 128, as in nanoGPT
    assert count_params(shapes) == 124_439_808 + (50304 - 50257) * 768  # tied: the padding is allocated once
    # Llama 3.2's 128256 and Llama 2's 32000 are multiples of 128 already.
    for name, expected in (("llama_1b", 1_235_814_400), ("llama_7b", 6_738_415_616)):
        assert count_params(abstract_model(load_config(f"configs/{name}.py").model)[1]) == expected


def test_flops_per_token_follows_6n_plus_attention():
    cfg = load_config("configs/gpt2_small.py").model
    _, shapes, _ = abstract_model(cfg)
    # Parameters as allocated (the padded vocabulary: the output matmul computes those columns too), less the
    # positions, a lookup; the tied embedding is the output matmul.
    n_matmul = 124_439_808 + (50304 - 50257) * 768 - 1024 * 768
    assert flops_per_token(cfg, shapes) == 6 * n_matmul + 12 * 12 * 768 * 1024


def _forward(cfg, params, tokens):
    graphdef, _, _ = abstract_model(cfg)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return nnx.merge(graphdef, params)(tokens, pos, jnp.ones(tokens.shape, jnp.int32))[0]


def test_speedrun_knobs_build_and_do_what_they_say():
    """model.mlp=relu2, qk_norm, zero_init_out and logit_softcap (the nanoGPT speedruns' architecture changes)."""
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, 97)
    cfg = small_model_cfg("llama")
    cfg.update(mlp="relu2", qk_norm=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    block = params["blocks"][0]
    assert set(block["mlp"]) == {"up", "down"} and block["attn"]["query_norm"]["scale"].shape == (8,)
    _, _, axes = abstract_model(cfg)
    assert axes["blocks"][0]["attn"]["query_norm"]["scale"] == ("head_dim",)
    logits = _forward(cfg, params, tokens)
    # QK-norm makes attention blind to the scale of the query and key projections.
    scaled = jax.tree.map(lambda x: x, params)
    scaled["blocks"][0]["attn"]["query"] = 3.0 * params["blocks"][0]["attn"]["query"]
    np.testing.assert_allclose(_forward(cfg, scaled, tokens), logits, atol=1e-4)
    cfg.qk_norm = False
    plain = init_params(cfg, jax.random.PRNGKey(0))
    plain["blocks"][0]["attn"]["query"] = 3.0 * plain["blocks"][0]["attn"]["query"]
    assert not np.allclose(_forward(cfg, plain, tokens), _forward(cfg, init_params(cfg, jax.random.PRNGKey(0)),
                                                                  tokens), atol=1e-4)
    # Zero-initialised output projections: every block starts as the identity on the residual stream.
    cfg.update(mlp="", zero_init_out=True)
    zero = init_params(cfg, jax.random.PRNGKey(0))
    assert not np.any(zero["blocks"][1]["attn"]["out"]) and not np.any(zero["blocks"][1]["mlp"]["down"])
    without = jax.tree.map(lambda x: x, zero)
    for block in without["blocks"].values():
        block["attn"]["query"] = 0 * block["attn"]["query"]  # changes nothing: the block adds zero either way
    np.testing.assert_array_equal(_forward(cfg, without, tokens), _forward(cfg, zero, tokens))
    # Soft-capping bounds the real logits by the cap and keeps the padding ids masked.
    cfg.update(zero_init_out=False, logit_softcap=2.0)
    capped = init_params(cfg, jax.random.PRNGKey(0))
    capped["lm_head"] = 50.0 * capped["lm_head"]
    out = _forward(cfg, capped, tokens)
    assert float(jnp.abs(out[..., :97]).max()) <= 2.0 and float(out[..., :97].std()) > 0.5
    assert float(out[..., 97:].max()) == MASKED_LOGIT
    bad = base_config()
    bad.model.mlp = "relu3"
    with pytest.raises(ConfigError, match="model.mlp must be one of"):
        validate(bad)


def test_auto_dtype_is_float32_on_a_cpu_without_a_bfloat16_matrix_unit(monkeypatch):
    from lmjax.model import config as model_config

    assert model_config.compute_dtype("auto", "gpu") == model_config.compute_dtype("auto", "tpu") == "bfloat16"
    assert model_config.compute_dtype("float32", "tpu") == "float32"
    monkeypatch.setattr(model_config, "cpu_has_bf16_matrix_unit", lambda: False)
    assert model_config.compute_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(model_config, "cpu_has_bf16_matrix_unit", lambda: True)
    assert model_config.compute_dtype("auto", "cpu") == "bfloat16"
    knobs = small_model_cfg("gpt2")
    knobs.dtype = "auto"
    assert ModelConfig.from_config(knobs).dtype == "bfloat16"
