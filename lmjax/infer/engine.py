"""Continuous batching: a fixed pool of sequence slots over one KV cache, decoded together one token per step.

Each slot holds one request at its own length (the cache's write index is per row). A request waits until a
slot is free, is prefilled into it alone (its prompt padded to a power-of-two bucket, so prefill compiles once
per bucket), and joins the decode batch at the next step. `Engine.step` runs one jitted decode over all slots
with per-row sampling settings; a request's token n is drawn with `fold_in(PRNGKey(seed), n)` (as row 0, see
`row_key`), so its samples do not depend on its slot or on the other requests. Finished requests free their
slot at once.

Every shape is fixed: decode always runs all `num_slots` rows and prefill always one row, so a request computes
exactly the same numbers alone or among others (batch invariance), at the price of batch-1 latency paying for
the whole pool. `warmup` compiles every shape, after which nothing compiles.

Log-probabilities are those of the model's raw distribution (before temperature, top-k and top-p), with the
`TOP_LOGPROBS` most likely alternatives, for every generated token and, on request, every prompt token.

`submit` and `cancel` may be called from any thread while one thread drives `step` (or `run`). A callback
that raises (its caller has gone) cancels only its own request; an error in the model step itself ends
every request ("cancelled"), is kept in `failure`, and makes later `submit` calls raise.
"""

import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lmjax.config import DataError
from lmjax.infer.sampler import cache_length, prefill_logits, row_key, sample_rows
from lmjax.model.config import ModelConfig
from lmjax.model.params import Params
from lmjax.model.transformer import init_cache

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # alternatives returned with each token's log-probability (OpenAI's maximum)
MIN_PROMPT_BUCKET = 32  # the smallest prefill width; the others double up to the cache length


class TokenLogprob(NamedTuple):
    """A token's log-probability and the `TOP_LOGPROBS` most likely tokens at its position, best first."""

    logprob: float
    top: list[tuple[int, float]]


class Update(NamedTuple):
    """What one step did for one request: its new tokens with their log-probabilities and, once it is done, why
    ("stop", "length", "cancelled"). The update of the step that admitted the request also has the time it was
    admitted and, when asked for, the log-probabilities of prompt tokens 1.. (token 0 has none). A request that
    ends at an end id has that id and its log-probability in `stop_token` (it is not one of `tokens`)."""

    tokens: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] = []
    admitted_at: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    stop_token: tuple[int, TokenLogprob] | None = None


Callback = Callable[[int, Update], None]  # (request id, update), called from the thread that runs `step`


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and what it has produced so far."""

    id: int
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_ids: frozenset[int]
    prompt_logprobs: bool
    callback: Callback | None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


def prefill_buckets(max_len: int) -> list[int]:
    """Prefill widths: `MIN_PROMPT_BUCKET` doubling up to the cache length, which is always the last."""
    widths = [MIN_PROMPT_BUCKET]
    while widths[-1] < max_len:
        widths.append(widths[-1] * 2)
    return [w for w in widths if w < max_len] + [max_len]


def _logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of `tokens` [...] under `logits` [..., V], and the top `TOP_LOGPROBS` ids and values."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    return chosen, top_ids, top_values


def prefill_slot(params: Params, cache: dict, slot: jax.Array, tokens: jax.Array, length: jax.Array,
                 seed: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                 graphdef: nnx.GraphDef, cfg: ModelConfig, prompt_logprobs: bool) -> tuple[tuple, dict]:
    """Runs one right-padded prompt `tokens` [P] (`length` real tokens) into row `slot` of the per-row cache.
    Returns ((first sampled token, its logprob, top ids, top logprobs), and with `prompt_logprobs` the same
    three for every prompt position's next prompt token [P - 1]) and the cache."""
    logits, fresh = prefill_logits(params, tokens[None], length[None], init_cache(cfg, 1, tokens.shape[0]),
                                   graphdef=graphdef, every_position=prompt_logprobs)
    last = logits[0, length - 1] if prompt_logprobs else logits[0]
    rng = row_key(jax.random.fold_in(jax.random.PRNGKey(seed), 0), 0)
    token = sample_rows(last[None], rng[None], temperature[None], top_k[None], top_p[None])[0]
    out = (token, *_logprobs(last, token))
    if prompt_logprobs:
        out += _logprobs(logits[0, :-1], tokens[1:])
    put = lambda big, row: jax.lax.dynamic_update_slice(big, row.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))
    layers = [{name: put(big[name], row[name]) for name in big}
              for big, row in zip(cache["layers"], fresh["layers"], strict=True)]
    row_valid = jnp.arange(cache["valid"].shape[1]) < length
    return out, {"layers": layers, "valid": put(cache["valid"], row_valid[None]),
                 "index": cache["index"].at[slot].set(length)}


def decode_slots(params: Params, cache: dict, tokens: jax.Array, active: jax.Array, seeds: jax.Array,
                 steps: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                 graphdef: nnx.GraphDef) -> tuple[tuple, dict]:
    """Feeds each slot's last token [S] at its own cache index and samples the next one with the row's settings
    and key `fold_in(PRNGKey(seeds), steps)` (as row 0). Returns (next tokens, their logprobs, top ids, top
    logprobs) and the cache. Inactive rows compute garbage and keep their index."""
    index = jnp.minimum(cache["index"], cache["valid"].shape[1] - 1)
    logits, new = nnx.merge(graphdef, params)(
        tokens[:, None], index[:, None], active[:, None].astype(jnp.int32), cache={**cache, "index": index})
    rngs = jax.vmap(lambda s, n: row_key(jax.random.fold_in(jax.random.PRNGKey(s), n), 0))(seeds, steps)
    next_tokens = sample_rows(logits[:, 0], rngs, temperature, top_k, top_p)
    return ((next_tokens, *_logprobs(logits[:, 0], next_tokens)),
            {**new, "index": jnp.where(active, cache["index"] + 1, cache["index"])})


class Engine:
    """Serves many generation requests at once over `num_slots` KV-cache rows of `max_len` tokens each."""

    def __init__(self, model_cfg: ModelConfig | ConfigDict, graphdef: nnx.GraphDef, params: Params,
                 num_slots: int = 8, max_len: int | None = None, end_ids: Iterable[int] = ()):
        self.cfg = ModelConfig.from_config(model_cfg)
        self.graphdef = graphdef
        self.params = params
        self.num_slots = num_slots
        self.max_len = cache_length(self.cfg, max_len)
        self.end_ids = frozenset(end_ids)
        self.buckets = prefill_buckets(self.max_len)
        self._prefill = {
            flag: jax.jit(functools.partial(prefill_slot, graphdef=graphdef, cfg=self.cfg, prompt_logprobs=flag),
                          donate_argnums=1) for flag in (False, True)}
        self._decode = jax.jit(functools.partial(decode_slots, graphdef=graphdef), donate_argnums=1)
        # Committed to the parameters' device like every later (jit-output) cache, so the first call's
        # signature is the same as the others' and does not compile twice.
        leaf = jax.tree.leaves(params)[0]
        device = next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices()[0]
        self._cache = jax.device_put(init_cache(self.cfg, num_slots, self.max_len), device)
        self._slots: list[Request | None] = [None] * num_slots
        self._tokens = np.zeros(num_slots, np.int32)
        self._seeds = np.zeros(num_slots, np.int32)
        self._temperature = np.zeros(num_slots, np.float32)
        self._top_k = np.zeros(num_slots, np.int32)
        self._top_p = np.ones(num_slots, np.float32)
        self._ids = itertools.count()
        self._waiting: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._wakeup = threading.Condition()
        self.failure: BaseException | None = None  # the error that stopped `run`, if any

    def submit(self, prompt_ids: Sequence[int], max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0, stop_ids: Iterable[int] = (), prompt_logprobs: bool = False,
               callback: Callback | None = None) -> int:
        """Queues a request and returns its id. It ends at an end id (the engine's or its `stop_ids`; the stop
        token is not returned), after `max_tokens` tokens (capped by the free cache; 0 only prefills, e.g. to
        score the prompt with `prompt_logprobs`), or on `cancel`. `callback(id, Update)` is called after every
        step that gives it tokens or ends it."""
        if self.failure is not None:
            raise RuntimeError(f"the engine stopped after an error: {self.failure!r}")
        if not 0 < len(prompt_ids) < self.max_len:
            raise DataError(f"prompt is {len(prompt_ids)} tokens; it must be 1 to {self.max_len - 1}")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be at least 0, got {max_tokens}")
        if not 0 <= seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {seed}")
        request = Request(next(self._ids), list(prompt_ids), min(max_tokens, self.max_len - len(prompt_ids)),
                          temperature, top_p, top_k, seed, self.end_ids | frozenset(stop_ids), prompt_logprobs,
                          callback)
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()
        return request.id

    def cancel(self, request_id: int) -> None:
        """Ends a waiting or running request at the next step boundary (its slot is freed then)."""
        with self._wakeup:
            self._cancelled.add(request_id)
            self._wakeup.notify()

    def has_work(self) -> bool:
        """Whether a request is waiting or running."""
        return bool(self._waiting) or any(r is not None for r in self._slots)

    def load(self) -> tuple[int, int, float]:
        """(running requests, waiting requests, fraction of the KV cache's positions that running requests use)."""
        running = [r for r in self._slots if r is not None]
        used = sum(len(r.prompt) + len(r.tokens) for r in running)
        return len(running), len(self._waiting), used / (self.num_slots * self.max_len)

    def compilations(self) -> int:
        """How many programs prefill and decode have compiled so far."""
        return sum(f._cache_size() for f in (*self._prefill.values(), self._decode))

    def warmup(self) -> None:
        """Compiles every prefill width (with and without prompt log-probabilities) and the decode step, so
        that no request waits for a compilation."""
        for width in self.buckets:
            for flag in (False, True):
                self.generate_all([{"prompt_ids": [0] * min(width, self.max_len - 1), "max_tokens": 1,
                                    "prompt_logprobs": flag}])
        self.generate_all([{"prompt_ids": [0], "max_tokens": 2}])

    def step(self) -> dict[int, Update]:
        """Cancels, admits waiting requests into free slots (prefill gives their first token), then decodes
        one token for every running request. Returns the update of each request that changed."""
        updates: dict[int, dict] = {}
        with self._wakeup:
            cancelled, self._cancelled = self._cancelled, set()
            for request in [r for r in self._waiting if r.id in cancelled]:
                self._waiting.remove(request)
                self._finish(request, "cancelled", updates)
            for slot in range(self.num_slots):
                request = self._slots[slot]
                if request is not None and request.id in cancelled:
                    self._finish(request, "cancelled", updates)
                while self._slots[slot] is None and self._waiting:
                    self._admit(slot, self._waiting.popleft(), updates)
        running = [slot for slot, r in enumerate(self._slots) if r is not None]
        if running:
            active = np.array([r is not None for r in self._slots])
            steps = np.array([len(r.tokens) if r else 0 for r in self._slots], np.int32)
            out, self._cache = self._decode(self.params, self._cache, self._tokens, active, self._seeds, steps,
                                            self._temperature, self._top_k, self._top_p)
            tokens, chosen, top_ids, top_values = jax.device_get(out)
            for slot in running:
                self._take(slot, int(tokens[slot]), _token_logprob(chosen[slot], top_ids[slot], top_values[slot]),
                           updates)
        return self._report(updates)

    def run(self, stop: threading.Event, idle_wait: float = 0.1) -> None:
        """Steps until `stop` is set, sleeping while there is nothing to do: the loop for a background thread.
        An error in a step ends every request, is kept in `failure` and is raised."""
        while not stop.is_set():
            with self._wakeup:
                if not self.has_work() and not self._cancelled:
                    self._wakeup.wait(idle_wait)
                    continue
            try:
                self.step()
            except Exception as e:
                self.failure = e
                updates: dict[int, dict] = {}
                with self._wakeup:
                    for request in [*self._waiting, *(r for r in self._slots if r is not None)]:
                        self._finish(request, "cancelled", updates)
                    self._waiting.clear()
                self._report(updates)
                raise

    def generate_all(self, requests: Sequence[dict]) -> list[list[int]]:
        """The tokens of each request (keyword arguments of `submit`), run together until all are done."""
        ids = [self.submit(**r) for r in requests]
        out: dict[int, list[int]] = {i: [] for i in ids}
        pending = set(ids)
        while pending:
            for request_id, update in self.step().items():
                if request_id in out:
                    out[request_id] += update.tokens
                    if update.finish_reason is not None:
                        pending.discard(request_id)
        return [out[i] for i in ids]

    def _report(self, updates: dict[int, dict]) -> dict[int, Update]:
        """The `Update` of each request in `updates`, also given to its callback. A callback that raises
        cancels its request and is logged; the engine goes on."""
        done = {}
        for request_id, fields in updates.items():
            request = fields.pop("request")
            done[request_id] = Update(finish_reason=request.finish_reason, **fields)
            if request.callback is not None:
                try:
                    request.callback(request_id, done[request_id])
                except Exception:
                    log.exception("the callback of request %d failed; cancelling it", request_id)
                    if request.finish_reason is None:
                        self.cancel(request_id)
        return done

    def _admit(self, slot: int, request: Request, updates: dict[int, dict]) -> None:
        """Prefills `request` into `slot` and takes its first token; the slot stays free if it asked for no
        tokens or ended at once."""
        length = len(request.prompt)
        width = next(w for w in self.buckets if w >= length)
        tokens = np.zeros(width, np.int32)
        tokens[:length] = request.prompt
        settings = (np.float32(request.temperature), np.int32(request.top_k), np.float32(request.top_p))
        out, self._cache = self._prefill[request.prompt_logprobs](
            self.params, self._cache, np.int32(slot), tokens, np.int32(length), np.int32(request.seed), *settings)
        out = jax.device_get(out)
        fields = updates.setdefault(request.id, _fields(request))
        fields["admitted_at"] = time.time()
        if request.prompt_logprobs:
            chosen, top_ids, top_values = out[4:]
            fields["prompt_logprobs"] = [_token_logprob(chosen[i], top_ids[i], top_values[i])
                                         for i in range(length - 1)]
        if request.max_tokens == 0:
            self._finish(request, "length", updates)
            return
        self._slots[slot] = request
        self._seeds[slot] = request.seed
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = settings
        self._take(slot, int(out[0]), _token_logprob(*out[1:4]), updates)

    def _take(self, slot: int, token: int, logprob: TokenLogprob, updates: dict[int, dict]) -> None:
        """Records a slot's new token; frees the slot when the request ends."""
        request = self._slots[slot]
        fields = updates.setdefault(request.id, _fields(request))
        if token in request.stop_ids:
            fields["stop_token"] = (token, logprob)
            self._finish(request, "stop", updates)
            return
        request.tokens.append(token)
        fields["tokens"].append(token)
        fields["logprobs"].append(logprob)
        self._tokens[slot] = token
        if len(request.tokens) >= request.max_tokens:
            self._finish(request, "length", updates)

    def _finish(self, request: Request, reason: str, updates: dict[int, dict]) -> None:
        request.finish_reason = reason
        updates.setdefault(request.id, _fields(request))
        if request in self._slots:
            self._slots[self._slots.index(request)] = None


def _fields(request: Request) -> dict:
    """The fields of an `Update` being collected during a step, with the request they belong to."""
    return {"request": request, "tokens": [], "logprobs": []}


def _token_logprob(chosen: np.ndarray, top_ids: np.ndarray, top_values: np.ndarray) -> TokenLogprob:
    return TokenLogprob(float(chosen), [(int(i), float(v)) for i, v in zip(top_ids, top_values, strict=True)])
