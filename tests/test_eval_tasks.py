"""Few-shot tasks: log-likelihood scoring against a plain forward pass, the built-in tasks through the CLI, the
same task in process and through lm-evaluation-harness's in-process adapter, and malformed tasks refused."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from lmjax.cli import main
from lmjax.config import DataError
from lmjax.eval.loglik import LoglikScorer
from lmjax.eval.tasks import BUILTIN, find_tasks, load_task, run_multiple_choice
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir


@pytest.fixture(scope="module")
def model(trained_run):
    return restore_model(open_workdir(trained_run[0]))


def _plain(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The reference: one forward pass of the whole sequence, no padding, no batching."""
    cfg, graphdef, params, _, _ = model
    ids = np.array([context + continuation], np.int32)
    logits, _ = nnx.merge(graphdef, params)(ids, np.arange(ids.shape[1])[None], np.ones_like(ids))
    logprobs = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32)))
    positions = range(len(context), len(context) + len(continuation))
    return (sum(float(logprobs[i - 1, ids[0, i]]) for i in positions),
            all(int(np.argmax(logprobs[i - 1])) == ids[0, i] for i in positions))


def test_scorer_equals_a_plain_forward_pass(model):
    cfg, graphdef, params, tokenizer, _ = model
    scorer = LoglikScorer(graphdef, params, cfg.model.seq_len, rows=4)
    text = [tokenizer.bos_id] + tokenizer.encode("def add(a, b):\n    return a + b\n")
    requests = [(text[:5], text[5:9]), (text[:2], text[2:3]), (text[:10], text[10:]), (text[:1], text[1:4]),
                (text[:3], text[3:12])]
    for (context, continuation), (got, greedy) in zip(requests, scorer.score(requests), strict=True):
        expected, expected_greedy = _plain(model, context, continuation)
        assert got == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    long_context = (text * 40)[:cfg.model.seq_len + 30]  # longer than the context: its start is dropped
    (got, _), = scorer.score([(long_context, text[1:4])])
    kept = long_context[-(cfg.model.seq_len + 1 - 3):]
    assert got == pytest.approx(_plain(model, kept, text[1:4])[0], abs=1e-4)
    with pytest.raises(DataError, match="empty continuation"):
        scorer.score([(text[:3], [])])


def test_builtin_tasks_through_the_cli(trained_run, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert main(["eval", "tasks", "--workdir", str(trained_run[0]), "--limit", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results) == {"stdlib_module_mc", "stdlib_docstring_mc", "stdlib_chat_qa", "mean"}
    for name in ("stdlib_module_mc", "stdlib_docstring_mc"):
        r = results[name]
        metric = find_tasks([name])[0].metric
        assert r["questions"] == 8 and r["chance"] == pytest.approx(0.25)
        assert r["centered"] == pytest.approx((r[metric] - 0.25) / 0.75) and name in printed
    assert results["stdlib_chat_qa"]["questions"] == 8 and 0 <= results["stdlib_chat_qa"]["rouge_l"] <= 1
    assert results["mean"]["centered"] == pytest.approx(np.mean([results[n]["centered"] for n in results
                                                                 if n != "mean"]))


def test_a_task_scores_the_same_through_lm_eval(model, trained_run, tmp_path):
    pytest.importorskip("lm_eval")
    import lmjax.eval.harness  # noqa: F401  (registers --model lmjax)

    rows = [json.loads(line) for line in (BUILTIN / "stdlib_module_mc.jsonl").read_text().splitlines()][3:15]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "task: lmjax_module_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tmp_path / "ours.yaml").write_text("name: ours\nkind: multiple_choice\ndata: mc.jsonl\nfewshot: 0\n")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    theirs = simple_evaluate(model="lmjax", model_args=f"workdir={trained_run[0]}", tasks=["lmjax_module_mc"],
                             task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    cfg, graphdef, params, tokenizer, _ = model
    ours = run_multiple_choice(load_task(tmp_path / "ours.yaml"), LoglikScorer(graphdef, params, cfg.model.seq_len),
                               tokenizer)
    assert theirs["results"]["lmjax_module_mc"]["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["results"]["lmjax_module_mc"]["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    sample = theirs["samples"]["lmjax_module_mc"][0]
    context = [tokenizer.bos_id] + tokenizer.encode(sample["doc"]["context"])
    truncated = 0
    for choice, response in zip(sample["doc"]["choices"], sample["filtered_resps"], strict=True):
        whole = [tokenizer.bos_id] + tokenizer.encode(sample["doc"]["context"] + " " + choice)
        continuation = whole[len(context):]
        kept = whole[-(cfg.model.seq_len + 1):]  # a longer request loses its oldest tokens to fit the context
        truncated += len(kept) < len(whole)
        assert float(response[0]) == pytest.approx(_plain(model, kept[:-len(continuation)], continuation)[0],
                                                   rel=1e-5)
    assert truncated  # one choice of this sample does not fit the 64-token context whole


def test_malformed_tasks_are_refused(tmp_path):
    shutil.copy(BUILTIN / "stdlib_module_mc.jsonl", tmp_path / "data.jsonl")
    cases = {
        "name: x\nkind: essay\ndata: data.jsonl\n": "kind must be one of",
        "name: x\nkind: multiple_choice\n": "must be a mapping with name, kind and data",
        "name: x\nkind: multiple_choice\ndata: data.jsonl\nshots: 2\n": "unknown keys",
        "name: x\nkind: multiple_choice\ndata: data.jsonl\nmetric: f1\n": "metric must be",
        "name: x\nkind: generation\ndata: data.jsonl\n": "needs context, target",
        "name: [x\n": "cannot read task",
    }
    for text, message in cases.items():
        (tmp_path / "t.yaml").write_text(text)
        with pytest.raises(DataError, match=message):
            load_task(tmp_path / "t.yaml")
    (tmp_path / "data.jsonl").write_text('{"context": "q", "choices": ["a"], "answer": 0}\n')
    (tmp_path / "t.yaml").write_text("name: x\nkind: multiple_choice\ndata: data.jsonl\n")
    with pytest.raises(DataError, match=r"data.jsonl:1.*at least 2"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").unlink()
    with pytest.raises(DataError, match="unknown task"):
        find_tasks(["nope"], tmp_path)
