"""Continuous batching: parity with Sampler, per-request determinism, no recompilation, stop/length/cancel."""

import queue
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from lmjax.config import base_config
from lmjax.infer.engine import TOP_LOGPROBS, Engine, Update
from lmjax.infer.sampler import Sampler
from lmjax.model.params import abstract_model, init_params

SEQ_LEN = 64
VOCAB = 256
SHARPEN = 5.0  # scaled-up weights, so that a random model's greedy text varies instead of repeating one token


class IdTokenizer:
    """Just enough of a Tokenizer for Sampler: its text is the token ids, so texts compare as ids; no end token,
    so that outputs run to their length."""

    bos_id, eos_id, special_ids, stop_ids = 1, -1, {}, []

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def build(family: str):
    cfg = base_config().model
    cfg.update(family=family, vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2 if family == "llama" else 0,
               d_model=64, d_ff=128, seq_len=SEQ_LEN, dtype="float32")
    graphdef, _, _ = abstract_model(cfg)
    params = jax.tree.map(lambda x: x * SHARPEN if x.ndim >= 2 else x, init_params(cfg, jax.random.PRNGKey(0)))
    return cfg, graphdef, params


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def engine(llama) -> Engine:
    return Engine(*llama, num_slots=4)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(1000 * n + salt).integers(2, VOCAB, n)]


def sampler_tokens(sampler: Sampler, ids: list[int], max_tokens: int, **kwargs) -> list[int]:
    text = sampler.generate([], max_tokens, prompt_ids=[ids], **kwargs)[0]
    return [int(t) for t in text.split()]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_sampler(family, llama):
    """Requests of different lengths, more than there are slots, decode in one batch at their own cache rows
    and give exactly Sampler's greedy tokens."""
    model = llama if family == "llama" else build(family)
    engine = Engine(*model, num_slots=3)
    sampler = Sampler(model[0], model[1], model[2], IdTokenizer())
    prompts = [prompt(n) for n in (1, 5, 17, 33, 40, 9)]
    outputs = engine.generate_all([{"prompt_ids": p, "max_tokens": 30} for p in prompts])
    for p, out in zip(prompts, outputs, strict=True):
        assert out == sampler_tokens(sampler, p, 30, temperature=0.0)
        assert len(out) == min(30, SEQ_LEN - len(p))


def test_seeded_request_alone_or_among_63_others(llama):
    """A seeded request's tokens do not depend on its slot or on 63 other requests with other settings."""
    engine = Engine(*llama, num_slots=64)
    target = {"prompt_ids": prompt(7), "max_tokens": 20, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 5}
    alone = engine.generate_all([target])[0]
    others = [{"prompt_ids": prompt(1 + i % 30, salt=i), "max_tokens": 5 + i % 17, "temperature": 0.5 * (i % 4),
               "top_k": i % 3 * 20, "top_p": 1.0 - 0.1 * (i % 5), "seed": i} for i in range(63)]
    mixed = engine.generate_all(others[:40] + [target] + others[40:])
    assert mixed[40] == alone
    assert len(alone) == 20 and len(set(alone)) > 3
    reseeded = engine.generate_all([{**target, "seed": 6}])[0]
    assert reseeded != alone
    sampler = Sampler(llama[0], llama[1], llama[2], IdTokenizer())
    assert alone == sampler_tokens(sampler, target["prompt_ids"], 20, temperature=1.0, top_k=50, top_p=0.95, seed=5)


def test_queue_gives_same_tokens_as_alone(engine):
    """With 4 slots and 10 requests the queue refills freed slots mid-run; every request's tokens are the ones
    it gets alone."""
    requests = [{"prompt_ids": prompt(3 + 4 * i), "max_tokens": 3 + 5 * (i % 4), "temperature": 0.8 * (i % 2),
                 "seed": 100 + i} for i in range(10)]
    alone = [engine.generate_all([r])[0] for r in requests]
    assert engine.generate_all(requests) == alone


def test_nothing_recompiles_after_warmup(llama):
    """After `warmup`, requests of any length and settings, scoring included, compile nothing."""
    engine = Engine(*llama, num_slots=4)
    engine.warmup()
    assert engine.compilations() == 2 * len(engine.buckets) + 1 == 2 * len([32, 64]) + 1
    rng = np.random.default_rng(0)
    engine.generate_all([{"prompt_ids": prompt(int(rng.integers(1, 60)), salt=i),
                          "max_tokens": int(rng.integers(0, 20)), "temperature": float(rng.uniform(0, 2)),
                          "top_k": int(rng.integers(0, 100)), "top_p": float(rng.uniform(0.1, 1.0)),
                          "seed": i, "stop_ids": [int(rng.integers(2, VOCAB))], "prompt_logprobs": i % 2 == 0}
                         for i in range(24)])
    assert engine.compilations() == 2 * len(engine.buckets) + 1


def test_logprobs_match_a_full_forward(llama, engine):
    """Prompt and generated tokens' log-probabilities (and their top alternatives) are those of one forward pass
    over the whole sequence; max_tokens=0 only scores the prompt."""
    cfg, graphdef, params = llama
    ids = prompt(9)
    updates = []
    request = engine.submit(ids, max_tokens=5, prompt_logprobs=True, callback=lambda i, u: updates.append(u))
    while not updates or updates[-1].finish_reason is None:
        engine.step()
    tokens = [t for u in updates for t in u.tokens]
    logprobs = [lp for u in updates for lp in u.logprobs]
    prompt_logprobs = updates[0].prompt_logprobs
    assert request is not None and len(tokens) == len(logprobs) == 5 and len(prompt_logprobs) == len(ids) - 1
    sequence = np.array([ids + tokens], np.int32)
    logits, _ = nnx.merge(graphdef, params)(sequence, np.arange(sequence.shape[1])[None], np.ones_like(sequence))
    expected = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32)))
    for position, got in enumerate(prompt_logprobs + logprobs):
        target = sequence[0, position + 1]
        np.testing.assert_allclose(got.logprob, expected[position, target], atol=1e-4)
        top_ids = [i for i, _ in got.top]
        assert top_ids == list(np.argsort(-expected[position])[:TOP_LOGPROBS])
    assert all(lp.logprob == lp.top[0][1] for lp in logprobs)  # greedy: the chosen token is the best one
    scored = []
    engine.submit(ids, max_tokens=0, prompt_logprobs=True, callback=lambda i, u: scored.append(u))
    while not scored:
        engine.step()
    assert scored[0].tokens == [] and scored[0].finish_reason == "length"
    assert [lp.logprob for lp in scored[0].prompt_logprobs] == [lp.logprob for lp in prompt_logprobs]


def test_stop_length_and_cancel(engine):
    """A stop id ends a request without being returned, max_tokens ends it after that many tokens, and a
    cancelled request frees its slot for a waiting one; callbacks see every token and the finish reason."""
    ids = prompt(11)
    full = engine.generate_all([{"prompt_ids": ids, "max_tokens": 12}])[0]
    stop = full[4]
    seen: dict[int, list[Update]] = {}
    record = lambda request_id, update: seen.setdefault(request_id, []).append(update)
    stopped = engine.submit(ids, 12, stop_ids=[stop], callback=record)
    short = engine.submit(ids, 3, callback=record)
    cancelled = [engine.submit(prompt(20), 40, callback=record) for _ in range(2)]
    waiting = engine.submit(prompt(6), 5, callback=record)
    engine.step()
    engine.step()
    engine.cancel(cancelled[0])
    engine.cancel(waiting)
    late = engine.submit(ids, 6, callback=record)
    while engine.has_work():
        engine.step()
    tokens = {i: [t for u in updates for t in u.tokens] for i, updates in seen.items()}
    reasons = {i: updates[-1].finish_reason for i, updates in seen.items()}
    assert tokens[stopped] == full[: full.index(stop)] and reasons[stopped] == "stop"
    assert tokens[short] == full[:3] and reasons[short] == "length"
    assert len(tokens[cancelled[0]]) == 3 and reasons[cancelled[0]] == "cancelled"
    assert tokens[waiting] == [] and reasons[waiting] == "cancelled"
    assert tokens[late] == full[:6] and reasons[late] == "length"
    assert reasons[cancelled[1]] == "length" and len(tokens[cancelled[1]]) == 40
    assert all(u.finish_reason is None for updates in seen.values() for u in updates[:-1])


def test_background_thread(engine):
    """`run` in a thread serves requests submitted from another thread through a queue callback."""
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,))
    thread.start()
    updates: queue.Queue = queue.Queue()
    request_id = engine.submit(prompt(11), 8, callback=lambda i, u: updates.put(u))
    tokens, reason = [], None
    while reason is None:
        update = updates.get(timeout=30)
        tokens += update.tokens
        reason = update.finish_reason
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and reason == "length"
    assert tokens == engine.generate_all([{"prompt_ids": prompt(11), "max_tokens": 8}])[0]
    assert request_id >= 0


def test_bad_requests_are_refused(engine, llama):
    with pytest.raises(ValueError, match="must be 1 to 63"):
        engine.submit([3] * SEQ_LEN)
    with pytest.raises(ValueError, match="must be 1 to 63"):
        engine.submit([])
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([3], max_tokens=-1)
    with pytest.raises(ValueError, match="seed"):
        engine.submit([3], seed=-1)
    assert not engine.has_work() and engine.step() == {}
    with pytest.raises(ValueError, match="learned positions"):
        Engine(*build("gpt2"), max_len=SEQ_LEN + 1)


def test_a_failing_callback_cancels_only_its_request(engine):
    """A caller that has gone away (its callback raises, e.g. on a closed event loop) loses its request; the
    engine thread and the other requests go on."""
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,))
    thread.start()

    def gone(_, __):
        raise RuntimeError("Event loop is closed")

    updates: queue.Queue = queue.Queue()
    engine.submit(prompt(9), 40, callback=gone)
    engine.submit(prompt(7), 6, callback=lambda i, u: updates.put(u))
    tokens, reason = [], None
    while reason is None:
        update = updates.get(timeout=30)
        tokens += update.tokens
        reason = update.finish_reason
    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:  # the next step cancels the first request
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=10)
    assert reason == "length" and len(tokens) == 6
    assert engine.failure is None and not engine.has_work()


def test_an_error_in_a_step_ends_every_request_and_refuses_new_ones(llama):
    engine = Engine(*llama, num_slots=2)
    updates: queue.Queue = queue.Queue()
    engine.submit(prompt(5), 8, callback=lambda i, u: updates.put(u))
    engine.step()
    engine._decode = lambda *args: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.run(threading.Event())
    while (update := updates.get(timeout=5)).finish_reason is None:
        pass
    assert update.finish_reason == "cancelled" and not engine.has_work()
    with pytest.raises(RuntimeError, match="stopped after an error.*device lost"):
        engine.submit(prompt(5), 8)
