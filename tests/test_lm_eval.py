"""lm-evaluation-harness scores through `lmjax serve` exactly as lmjax does in process.

lm-eval runs `--model local-completions` against the live server, picking up its tokenizer over HTTP
(`tokenizer_backend=remote`); the tasks' YAML and data are in tests/data/lm_eval (no hub)."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import API_KEYS
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lm_eval"
ALICE = API_KEYS["alice"][0]


@pytest.fixture(scope="module")
def results(api_server, chat_engine, monkeypatch_module):
    """lm-eval's results (with per-request samples) for both tasks, run over HTTP."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    server = api_server[0]
    monkeypatch_module.chdir(TASKS)  # the YAML names its data file relative to the working directory
    monkeypatch_module.setenv("OPENAI_API_KEY", ALICE)
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    model_args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=remote,auth_token={ALICE},"
                  f"max_length={chat_engine.context},custom_prefix_token_id={chat_engine.tokenizer.bos_id},"
                  "num_concurrent=4,max_retries=1")
    return simple_evaluate(model="local-completions", model_args=model_args, batch_size=4,
                           tasks=["lmjax_python_mc", "lmjax_python_text"],
                           task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def score(chat_engine, ids: list[int], start: int) -> float:
    """Sum of the log-probabilities of ids[start:] given what precedes them, from one forward pass in process."""
    engine = chat_engine.engine
    sequence = np.array([ids], np.int32)
    logits, _ = nnx.merge(engine.graphdef, engine.params)(sequence, np.arange(len(ids))[None], np.ones_like(sequence))
    logprobs = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32), axis=-1))
    return float(sum(logprobs[i - 1, ids[i]] for i in range(start, len(ids))))


def test_multiple_choice_loglikelihoods_and_accuracy_match_in_process(results, chat_engine):
    tok = chat_engine.tokenizer
    samples = results["samples"]["lmjax_python_mc"]
    assert len(samples) == 12
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        context = tok.encode(doc["question"])
        expected = []
        for choice in doc["choices"]:
            whole = tok.encode(f"{doc['question']} {choice}")
            expected.append(score(chat_engine, whole, len(context)))
        got = [float(r[0]) for r in sample["filtered_resps"]]
        np.testing.assert_allclose(got, expected, atol=1e-4)
        correct += int(np.argmax(expected) == doc["answer"])
    assert results["results"]["lmjax_python_mc"]["acc,none"] == pytest.approx(correct / len(samples))


def test_rolling_loglikelihood_gives_in_process_bits_per_byte(results, chat_engine):
    tok = chat_engine.tokenizer
    total, nbytes = 0.0, 0
    for sample in results["samples"]["lmjax_python_text"]:
        text = sample["doc"]["text"]
        ids = [tok.bos_id] + tok.encode(text)
        assert len(ids) <= chat_engine.context  # one window: the prefix token, then the text
        total += score(chat_engine, ids, 1)
        nbytes += len(text.encode())
    bpb = -total / nbytes / math.log(2)
    assert results["results"]["lmjax_python_text"]["bits_per_byte,none"] == pytest.approx(bpb, abs=1e-4)
