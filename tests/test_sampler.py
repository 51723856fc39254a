"""Sampling: cached decoding against the full forward pass, the sample_logits filters, and Sampler."""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from lmjax.config import base_config
from lmjax.infer.sampler import Sampler, prefill, sample_logits
from lmjax.model.params import Params, abstract_model, init_params
from lmjax.model.transformer import init_cache
from lmjax.text.tokenizer import Tokenizer

FAMILIES = ("gpt2", "llama")
SEQ_LEN = 64
SHARPEN = 5.0  # weight matrices are scaled up so a random model's greedy text varies instead of repeating one token
PROMPTS = ("Return the", "This module provides a way to", "x")


@dataclasses.dataclass
class TinyModel:
    cfg: ConfigDict
    graphdef: nnx.GraphDef
    params: Params
    forward: Callable[[Params, jax.Array], jax.Array]  # (params, tokens [B, SEQ_LEN]) -> logits, no cache

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """The next `n` greedy tokens after `ids`, one full (uncached) forward pass each."""
        ids = list(ids)
        for _ in range(n):
            row = np.zeros((1, SEQ_LEN), np.int32)
            row[0, : len(ids)] = ids
            ids.append(int(np.argmax(self.forward(self.params, row)[0, len(ids) - 1])))
        return ids[len(ids) - n :]


def build_model(family: str, vocab_size: int, dtype: str = "float32") -> TinyModel:
    """A random model whose parameters do not depend on `dtype` (the compute dtype; they stay float32)."""
    cfg = base_config().model
    cfg.update(family=family, vocab_size=vocab_size, num_layers=2, num_heads=4,
               num_kv_heads=2 if family == "llama" else 0, d_model=64, d_ff=128, seq_len=SEQ_LEN, dtype=dtype)
    graphdef, _, _ = abstract_model(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * SHARPEN if x.ndim >= 2 else x, params)

    @jax.jit
    def forward(params: Params, tokens: jax.Array) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))[0]

    return TinyModel(cfg, graphdef, params, forward)


@pytest.fixture(scope="module")
def tokenizer(shared_tokenizer) -> Tokenizer:
    return shared_tokenizer


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, TinyModel]:
    return {family: build_model(family, tokenizer.vocab_size) for family in FAMILIES}


@pytest.fixture(scope="module")
def bf16_models(tokenizer) -> dict[str, TinyModel]:
    return {family: build_model(family, tokenizer.vocab_size, "bfloat16") for family in FAMILIES}


@pytest.fixture(scope="module")
def sampler(models, tokenizer) -> Sampler:
    m = models["llama"]
    return Sampler(m.cfg, m.graphdef, m.params, tokenizer)


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    return {tokenizer.eos_id, tokenizer.special_ids["<|end|>"]}


# --- KV cache ------------------------------------------------------------------------------------


def decode_sequences(vocab_size: int) -> np.ndarray:
    """Three random token sequences [3, SEQ_LEN] (no special ids) for the KV-cache tests."""
    return np.random.default_rng(0).integers(8, vocab_size, (3, SEQ_LEN)).astype(np.int32)


def check_cached_decode(m: TinyModel, atol: float) -> np.ndarray:
    """Prefills right-padded prompts of 3, 16 and 9 tokens of `decode_sequences`, decodes 6 more with the KV
    cache and checks the logits after every token against the full (uncached) forward pass; returns those
    full logits [3, SEQ_LEN, V]."""
    lengths, steps, width, max_len = np.array([3, 16, 9]), 6, 16, 32
    rows = np.arange(len(lengths))
    seqs = decode_sequences(m.cfg.vocab_size)
    tokens = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = seqs[row, :n]

    step = jax.jit(lambda p, tok, pos, cache: nnx.merge(m.graphdef, p)(
        tok[:, None], pos[:, None], jnp.ones_like(tok)[:, None], cache=cache))
    logits, cache = jax.jit(functools.partial(prefill, graphdef=m.graphdef))(
        m.params, tokens, jnp.asarray(lengths, jnp.int32), init_cache(m.cfg, len(lengths), max_len))
    full = np.asarray(m.forward(m.params, seqs))
    for s in range(steps + 1):
        np.testing.assert_allclose(logits, full[rows, lengths - 1 + s], atol=atol, rtol=0, err_msg=f"step {s}")
        out, cache = step(m.params, seqs[rows, lengths + s], jnp.asarray(lengths + s, jnp.int32), cache)
        logits = out[:, 0]
    np.testing.assert_array_equal(cache["index"], lengths + steps + 1)
    return full


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_full_forward(models, family):
    check_cached_decode(models[family], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_full_forward_in_bfloat16(models, bf16_models, family):
    """The cached and the full pass round their bfloat16 activations along different paths (other shapes,
    other accumulation orders), so they may differ by what bfloat16 rounding does to the logits: at most 4
    roundings (unit roundoff 2^-8) of the logits' scale, which also bounds bfloat16 against float32. A wrong
    slot, position or mask in the cache moves logits by about their whole scale instead."""
    m = models[family]
    exact = np.asarray(m.forward(m.params, decode_sequences(m.cfg.vocab_size)))
    atol = 4 * 2.0**-8 * np.abs(exact[..., : m.cfg.vocab_size]).max()  # the masked padding ids excluded
    rounded = check_cached_decode(bf16_models[family], atol=atol)
    assert rounded.dtype == np.float32 and not np.array_equal(rounded, exact)  # bfloat16 compute, float32 logits
    np.testing.assert_allclose(rounded, exact, atol=atol, rtol=0)


# --- sample_logits -------------------------------------------------------------------------------

LOGITS = 3.0 * jax.random.normal(jax.random.PRNGKey(42), (6, 100))


@functools.partial(jax.jit, static_argnames=("n", "seed"))
def draw(logits: jax.Array, temperature: float, top_k: int, top_p: float, n: int = 400, seed: int = 0) -> np.ndarray:
    """Tokens [n, B] sampled with n different keys."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    sample = lambda rng: sample_logits(logits, rng, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    return jax.vmap(sample)(keys)


def argmax_rows(n: int) -> np.ndarray:
    return np.broadcast_to(np.argmax(LOGITS, -1), (n, LOGITS.shape[0]))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_zero_temperature_is_argmax_whatever_the_filters(temperature):
    np.testing.assert_array_equal(draw(LOGITS, temperature, 0, 1.0, n=8), argmax_rows(8))
    np.testing.assert_array_equal(draw(LOGITS, temperature, 7, 0.5, n=8), argmax_rows(8))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 50.0])
def test_top_k_one_and_tiny_top_p_are_argmax(temperature):
    np.testing.assert_array_equal(draw(LOGITS, temperature, 1, 1.0), argmax_rows(400))
    np.testing.assert_array_equal(draw(LOGITS, temperature, 0, 1e-6), argmax_rows(400))
    np.testing.assert_array_equal(draw(LOGITS, temperature, 0, 0.0), argmax_rows(400))


@pytest.mark.parametrize("k", [2, 5, 20])
def test_top_k_samples_stay_in_the_top_k(k):
    tokens = np.asarray(draw(LOGITS, 3.0, k, 1.0))
    top = np.argsort(-np.asarray(LOGITS), -1)[:, :k]
    for row in range(LOGITS.shape[0]):
        assert set(tokens[:, row]) <= set(top[row]), f"row {row}"
        assert len(set(tokens[:, row])) == k if k <= 5 else len(set(tokens[:, row])) > 1


@pytest.mark.parametrize("top_k", [0, 3])
def test_top_p_samples_stay_in_the_nucleus(top_k):
    logits = LOGITS / 3.0
    tokens = np.asarray(draw(logits, 1.0, top_k, 0.9))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for row in range(logits.shape[0]):
        order = np.argsort(-probs[row])
        size = int(np.searchsorted(np.cumsum(probs[row, order]), 0.9)) + 1
        allowed = set(order[: min(size, top_k or size)])
        assert set(tokens[:, row]) <= allowed, f"row {row}"
        assert len(set(tokens[:, row])) > 1


def test_same_seed_same_tokens_and_other_seeds_differ():
    a = np.asarray(draw(LOGITS, 1.0, 0, 1.0, seed=7))
    np.testing.assert_array_equal(a, draw(LOGITS, 1.0, 0, 1.0, seed=7))
    assert not np.array_equal(a, draw(LOGITS, 1.0, 0, 1.0, seed=8))


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "expected"), [
    (1.0, 0, 1.0, [0.5, 0.3, 0.2]),
    (2.0, 0, 1.0, np.sqrt([0.5, 0.3, 0.2]) / np.sqrt([0.5, 0.3, 0.2]).sum()),
    (1.0, 2, 1.0, [0.625, 0.375, 0.0]),
    (1.0, 0, 0.7, [0.625, 0.375, 0.0]),
])
def test_samples_follow_the_filtered_distribution(temperature, top_k, top_p, expected):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    tokens = np.asarray(draw(logits, temperature, top_k, top_p, n=2000))[:, 0]
    np.testing.assert_allclose(np.bincount(tokens, minlength=3) / len(tokens), expected, atol=0.04)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.0, 0, 1.0), (1.0, 0, 1.0), (1e3, 0, 1.0),
                                                          (1e3, 128, 1.0), (5.0, 0, 0.999)])
def test_padding_ids_of_a_padded_vocabulary_are_never_sampled(temperature, top_k, top_p):
    """A model with 100 tokens has 128 logits (`model.vocab_multiple`); the 28 masked ones never come out,
    even when a huge temperature flattens the real ones."""
    m = build_model("llama", 100)
    logits = m.forward(m.params, jax.random.randint(jax.random.PRNGKey(3), (4, SEQ_LEN), 0, 100))[:, -1]
    assert logits.shape == (4, 128)
    tokens = np.asarray(draw(logits, temperature, top_k, top_p, n=2000))
    assert tokens.max() < 100
    assert len(np.unique(tokens)) > (90 if temperature >= 1e3 else 0)


# --- Sampler -------------------------------------------------------------------------------------


def completion(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of generated `ids` up to the first stop token."""
    stops = [i for i, t in enumerate(ids) if t in stop_ids(tokenizer)]
    return tokenizer.decode(ids[: stops[0] if stops else None])


def greedy_text(model: TinyModel, tokenizer: Tokenizer, prompt: str, n: int) -> str:
    """The uncached model's greedy completion of `prompt` in at most n tokens."""
    return completion(tokenizer, model.greedy([tokenizer.bos_id] + tokenizer.encode(prompt), n))


def test_batched_prompts_give_the_same_greedy_completions_as_alone(sampler, models, tokenizer):
    batch = sampler.generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    alone = [sampler.generate([p], max_new_tokens=12, temperature=0.0)[0] for p in PROMPTS]
    assert batch == alone
    assert batch == [greedy_text(models["llama"], tokenizer, p, 12) for p in PROMPTS]
    assert all(batch) and len(set(batch)) == len(PROMPTS)


def test_greedy_generation_follows_the_uncached_model_for_exactly_max_new_tokens(sampler, models, tokenizer):
    ids = [tokenizer.bos_id] + tokenizer.encode(PROMPTS[0])
    reference = models["llama"].greedy(ids, SEQ_LEN - len(ids))
    assert not stop_ids(tokenizer) & set(reference[:10])
    texts = [sampler.generate([PROMPTS[0]], max_new_tokens=n, temperature=0.0)[0] for n in (1, 4, 9, 10)]
    assert texts == [tokenizer.decode(reference[:n]) for n in (1, 4, 9, 10)]
    assert len(set(texts)) == len(texts)
    assert len(list(sampler.stream([PROMPTS[0]], max_new_tokens=9, temperature=0.0))) == 9

    longest = sampler.generate([PROMPTS[0]], max_new_tokens=1000, temperature=0.0)[0]
    assert longest == completion(tokenizer, reference)


def test_sampled_generation_never_exceeds_max_new_tokens(sampler):
    for seed in range(3):
        steps = list(sampler.stream(PROMPTS, max_new_tokens=5, temperature=1.5, seed=seed))
        assert 1 <= len(steps) <= 5


def test_stop_strings_cut_the_text_before_them(sampler):
    full = sampler.generate(PROMPTS, max_new_tokens=20, temperature=0.0)
    start = next(i for i in range(3, len(full[1]) - 2) if full[1][i : i + 2].isalnum())
    stop = full[1][start : start + 2]
    cut = sampler.generate(PROMPTS, max_new_tokens=20, temperature=0.0, stop=["never appears", stop])
    assert cut == [t[: t.index(stop)] if stop in t else t for t in full]
    assert len(cut[1]) < len(full[1])


def test_a_stop_string_far_into_a_long_generation_is_found(sampler):
    """The stop check decodes only the last tokens each step: a stop string first appearing well past that
    window still cuts the text exactly where it starts."""
    full = sampler.generate(PROMPTS, max_new_tokens=48, temperature=0.0)
    text = full[1]
    start = next(i for i in range(len(text) // 2, len(text) - 2)
                 if text[i : i + 2].isalnum() and text.index(text[i : i + 2]) == i)
    assert len(sampler.tokenizer.encode(text[:start])) > 4 * 2 + 4  # beyond the window of a 2-character stop
    stop = text[start : start + 2]
    assert sampler.generate(PROMPTS, max_new_tokens=48, temperature=0.0, stop=[stop]) == [
        t[: t.index(stop)] if stop in t else t for t in full]


def test_prompt_longer_than_the_context_raises(sampler, tokenizer):
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens but the model's context is 64"):
        sampler.generate(["word " * 100])
    with pytest.raises(ValueError, match="at most 63 tokens"):
        list(sampler.stream([""], prompt_ids=[[tokenizer.bos_id] * SEQ_LEN]))
    assert len(list(sampler.stream([""], max_new_tokens=5, prompt_ids=[[tokenizer.bos_id] * (SEQ_LEN - 1)]))) == 1


def test_gpt2_sampler_rejects_a_cache_longer_than_its_positions(models, tokenizer):
    m = models["gpt2"]
    with pytest.raises(ValueError, match="learned positions"):
        Sampler(m.cfg, m.graphdef, m.params, tokenizer, max_len=SEQ_LEN + 1)


def test_sampling_settings_and_lengths_do_not_recompile(models, tokenizer):
    m = models["llama"]
    fresh = Sampler(m.cfg, m.graphdef, m.params, tokenizer)
    calls = [
        dict(prompts=PROMPTS[:2], max_new_tokens=4, temperature=0.0),
        dict(prompts=PROMPTS[:2], max_new_tokens=6, temperature=0.8, top_k=5, top_p=0.9, seed=1),
        dict(prompts=PROMPTS[1:], max_new_tokens=20, temperature=1.3, top_p=0.5, stop=["e"]),
    ]
    for kwargs in calls:
        fresh.generate(**kwargs)
        assert fresh._decode._cache_size() == 1, kwargs
        assert fresh._prefill._cache_size() == 1, kwargs
