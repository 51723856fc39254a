"""Text generation: one prefill over the (right-padded) prompts, then one cached decode step per token.

Every row of the KV cache has its own length (`cache['index']` [B]), so each prompt starts at position 0 and
each row decodes at its own position.

`prefill` and `decode` are pure and jitted once per (batch size, prompt bucket) and (batch size,
cache length); sampling settings are traced arguments, so changing them never recompiles.
"""

import collections
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lmjax.config import DataError
from lmjax.model.config import ModelConfig
from lmjax.model.params import Params
from lmjax.model.transformer import init_cache
from lmjax.text.tokenizer import Tokenizer

PROMPT_BUCKET = 32  # prompts are padded to a multiple of this so prefill compiles for few lengths


def sample_rows(logits: jax.Array, rngs: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Next tokens [B] from logits [B, V], each row with its own key and settings ([B] each): greedy where
    temperature <= 0, else softmax(logits / T) restricted to the row's top_k most likely tokens (0 = all) and
    the smallest set of mass >= top_p. A row's token depends only on its own logits, key and settings (the
    same alone or in any batch); the sort over the vocabulary runs only when some row filters, and sampling
    only when some row samples. The model's masked padding ids (see `MASKED_LOGIT`) get probability 0, so V
    may be the padded vocabulary."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        filters = (top_k > 0) | (top_p < 1)
        masked = jax.lax.cond(jnp.any(filters), lambda: _filter(scaled, top_k, top_p, filters), lambda: scaled)
        draws = jax.vmap(jax.random.categorical)(rngs, masked).astype(jnp.int32)
        return jnp.where(temperature > 0, draws, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def _filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, filters: jax.Array) -> jax.Array:
    """`scaled` [B, V] with the tokens outside each filtering row's top-k / top-p set at -inf; rows that do not
    filter come back unchanged."""
    vocab = scaled.shape[-1]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    ranked = jnp.where(rank < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    kept = (rank == 0) | ((rank < k) & (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]))
    cutoff = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.where(filters[:, None], cutoff, -jnp.inf)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """`sample_rows` with one setting of each kind (scalars) for the whole batch; row r samples with key
    `fold_in(rng, r)` (see `row_key`)."""
    batch = logits.shape[0]
    full = lambda x: jnp.full((batch,), x)
    rngs = jax.vmap(functools.partial(row_key, rng))(jnp.arange(batch))
    return sample_rows(logits, rngs, full(temperature), full(top_k), full(top_p))


def row_key(step_key: jax.Array, row: jax.Array) -> jax.Array:
    """The sampling key of batch row `row` at a step: so a prompt samples the same tokens as row 0 of a batch
    as the continuous-batching engine, which gives every request row 0 (lmjax/infer/engine.py)."""
    return jax.random.fold_in(step_key, row)


def prefill_logits(params: Params, tokens: jax.Array, lengths: jax.Array, cache: dict, *,
                   graphdef: nnx.GraphDef, every_position: bool = True) -> tuple[jax.Array, dict]:
    """Runs right-padded prompts [B, P] of `lengths` [B] tokens into an empty cache; returns the logits at
    every position [B, P, V] (or, without `every_position`, only after each prompt's last token [B, V]) and
    the cache, each row's index at the end of its prompt."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    valid = positions < lengths[:, None]
    logits, cache = nnx.merge(graphdef, params)(tokens, positions, valid.astype(jnp.int32), cache=cache,
                                                logits_at=None if every_position else lengths - 1)
    return (logits if every_position else logits[:, 0]), {**cache, "index": lengths}


def prefill(params: Params, tokens: jax.Array, lengths: jax.Array, cache: dict, *,
            graphdef: nnx.GraphDef) -> tuple[jax.Array, dict]:
    """`prefill_logits` of each prompt's last token only [B, V]."""
    return prefill_logits(params, tokens, lengths, cache, graphdef=graphdef, every_position=False)


def decode(params: Params, token: jax.Array, cache: dict, rng: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, *, graphdef: nnx.GraphDef) -> tuple[jax.Array, dict]:
    """Feeds one token per row [B] at the row's own position (its cache index); returns the sampled next
    tokens and the cache."""
    logits, cache = nnx.merge(graphdef, params)(
        token[:, None], cache["index"][:, None], jnp.ones_like(token)[:, None], cache=cache)
    return sample_logits(logits[:, 0], rng, temperature, top_k, top_p), cache


def cache_length(cfg: ModelConfig, max_len: int | None) -> int:
    """KV-cache slots per row: `max_len`, default the training context; gpt2 cannot go past its learned
    positions."""
    max_len = max_len or cfg.seq_len
    if max_len > cfg.seq_len and cfg.arch.learned_positions:
        raise ValueError(f"max_len {max_len} exceeds the learned positions ({cfg.seq_len})")
    return max_len


class Sampler:
    """Generates text from a model's parameters with a KV cache of `max_len` slots."""

    def __init__(self, model_cfg: ModelConfig | ConfigDict, graphdef: nnx.GraphDef, params: Params,
                 tokenizer: Tokenizer, max_len: int | None = None):
        self.cfg = ModelConfig.from_config(model_cfg)
        self.params = params
        self.tokenizer = tokenizer
        self.max_len = cache_length(self.cfg, max_len)
        self._prefill = jax.jit(functools.partial(prefill, graphdef=graphdef), donate_argnums=3)
        self._decode = jax.jit(functools.partial(decode, graphdef=graphdef), donate_argnums=2)
        self._sample = jax.jit(sample_logits)
        # fold_in(key, i) for every step a generation can take, in one call instead of one per token.
        self._step_keys = jax.jit(lambda key: jax.vmap(functools.partial(jax.random.fold_in, key))(
            jnp.arange(self.max_len)))

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 128, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0,
                 prompt_ids: Sequence[Sequence[int]] | None = None) -> list[str]:
        """Completions of `prompts` (a batch of any lengths), cut at eos, a stop string or max_new_tokens."""
        rows = collections.deque(
            self._steps(prompts, max_new_tokens, temperature, top_k, top_p, stop, seed, prompt_ids), 1)
        return ([self._text(ids, cut) for ids, cut in rows[0]] if rows
                else [""] * len(prompts if prompt_ids is None else prompt_ids))

    def stream(self, prompts: Sequence[str], max_new_tokens: int = 128, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0,
               prompt_ids: Sequence[Sequence[int]] | None = None) -> Iterator[list[str]]:
        """Yields the completions so far after every decoded token. `prompt_ids` (already tokenized,
        e.g. a chat template) replaces `prompts` when given."""
        for rows in self._steps(prompts, max_new_tokens, temperature, top_k, top_p, stop, seed, prompt_ids):
            yield [self._text(ids, cut) for ids, cut in rows]

    def _text(self, ids: list[int], cut: int | None) -> str:
        return self.tokenizer.decode(ids)[:cut]

    def _stop_at(self, ids: list[int], stop: Sequence[str], window: int) -> int | None:
        """Where the text of `ids` ends if a stop string has just appeared in it, else None. Only the last
        `window` tokens are decoded each step (so a generation costs O(n), not O(n²)); the whole text is
        decoded once, on a hit."""
        tail = self.tokenizer.decode(ids[-window:])
        if not any(s in tail for s in stop):
            return None
        text = self.tokenizer.decode(ids)
        return min((text.index(s) for s in stop if s in text), default=None)

    def _steps(self, prompts: Sequence[str], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
               stop: Sequence[str], seed: int,
               prompt_ids: Sequence[Sequence[int]] | None) -> Iterator[list[tuple[list[int], int | None]]]:
        """After every decoded token, each row's generated ids (without eos; the live lists, so read them before
        the next step) and where its text ends (None: at its end; set once a stop string appears)."""
        stop = [s for s in stop if s]
        window = 4 * max(map(len, stop), default=0) + 4  # holds the longest stop string even at 4 byte tokens a char
        ids = [list(p) for p in prompt_ids] if prompt_ids is not None else [
            [self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompts]
        batch, longest = len(ids), max(len(p) for p in ids)
        if longest >= self.max_len:
            raise DataError(f"prompt is {longest} tokens but the model's context is {self.max_len}; "
                             f"shorten it to at most {self.max_len - 1} tokens")
        max_new_tokens = max(0, min(max_new_tokens, self.max_len - longest))
        width = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_len)
        tokens = np.zeros((batch, width), np.int32)
        for row, p in enumerate(ids):
            tokens[row, : len(p)] = p
        lengths = np.array([len(p) for p in ids], np.int32)
        cache = init_cache(self.cfg, batch, self.max_len)
        logits, cache = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(lengths), cache)
        step_keys = np.asarray(self._step_keys(jax.random.PRNGKey(seed)))
        settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        token = self._sample(logits, step_keys[0], *settings)
        stop_ids = set(self.tokenizer.stop_ids)
        generated: list[list[int]] = [[] for _ in range(batch)]
        cuts: list[int | None] = [None] * batch
        done = [False] * batch
        for step in range(max_new_tokens):
            last_step = step == max_new_tokens - 1
            if not last_step:
                # Queue the next step before reading this one: the device decodes while the host checks stops.
                next_token, cache = self._decode(self.params, token, cache, step_keys[step + 1], *settings)
            host_token = jax.device_get(token)
            for row in range(batch):
                if done[row]:
                    continue
                if int(host_token[row]) in stop_ids:
                    done[row] = True
                    continue
                generated[row].append(int(host_token[row]))
                if stop and (cut := self._stop_at(generated[row], stop, window)) is not None:
                    cuts[row], done[row] = cut, True
            yield list(zip(generated, cuts, strict=True))
            if all(done) or last_step:
                break
            token = next_token
