"""Preference tuning: the DPO terms, pair rows and the held-out split, DPO from a pretrained run, exporting
feedback."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lmjax.cli import main
from lmjax.config import ConfigError
from lmjax.input.pairs import pair_batches, pair_chunks, pair_row, prompt_key, read_pairs, split_heldout
from lmjax.serve.feedback import FeedbackStore
from lmjax.text.tokenizer import Tokenizer
from lmjax.train.dpo import pair_terms


def _pairs(items) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is item {i}?"}],
             "chosen": f"Item {i} is a number, thank you for asking.", "rejected": "No. Go away."} for i in items]


def test_dpo_terms_known_values_and_ties_count_half():
    loss, correct, margin = pair_terms(jnp.array([-1.0, -4.0, -2.0]), jnp.array([-3.0, -2.0, -2.0]),
                                       jnp.full(3, -2.0), jnp.full(3, -2.0), beta=0.5)
    margins = np.array([2.0, -2.0, 0.0])  # (-1 + 2) - (-3 + 2), (-4 + 2) - (-2 + 2), a tie
    np.testing.assert_allclose(margin, margins)
    np.testing.assert_allclose(loss, [math.log1p(math.exp(-0.5 * x)) for x in margins], rtol=1e-6)
    np.testing.assert_array_equal(correct, [1.0, 0.0, 0.5])
    rpo, _, _ = pair_terms(jnp.array([-1.0, -4.0, -2.0]), jnp.array([-3.0, -2.0, -2.0]), jnp.full(3, -2.0),
                           jnp.full(3, -2.0), beta=0.5, nll=0.5, chosen_tokens=jnp.array([2.0, 4.0, 0.0]))
    np.testing.assert_allclose(rpo - loss, [0.5 * 1 / 2, 0.5 * 4 / 4, 0.5 * 2 / 1], rtol=1e-6)  # 0 tokens: / 1


def test_heldout_split_keeps_every_pair_of_a_prompt_on_one_side():
    pairs = [{"prompt": [{"role": "user", "content": f"q{i % 40}"}], "chosen": f"c{i}", "rejected": f"r{i}"}
             for i in range(400)]  # ten pairs per prompt, as feedback export makes them
    train, heldout = split_heldout(pairs)
    train_prompts, heldout_prompts = {prompt_key(p) for p in train}, {prompt_key(p) for p in heldout}
    assert heldout and train and not train_prompts & heldout_prompts
    assert len(train) + len(heldout) == 400 and len(heldout) % 10 == 0


def test_pair_rows_mask_only_the_reply_and_batches_are_deterministic(trained_run):
    tokenizer = Tokenizer.load(trained_run[0] / "tokenizer")
    pairs = _pairs(range(10)) + [{"prompt": [{"role": "user", "content": "x " * 100}], "chosen": "a", "rejected": "b"}]
    chunks, dropped = pair_chunks(pairs, tokenizer, seq_len=64)
    assert len(chunks) == 10 and dropped == 1  # the long one is dropped, and counted
    row = pair_row(chunks[3], seq_len=64)
    assert tokenizer.decode(row["chosen_targets"][row["chosen_loss_mask"] == 1]) == pairs[3]["chosen"]
    assert tokenizer.decode(row["rejected_targets"][row["rejected_loss_mask"] == 1]) == "No. Go away."
    assert row["chosen_inputs"][0] == tokenizer.bos_id and not row["chosen_segment_ids"][-1]
    first = [next(pair_batches(chunks, 64, 4, seed=1))["chosen_inputs"] for _ in range(2)]
    np.testing.assert_array_equal(*first)
    it = pair_batches(chunks, 64, 5, seed=1)
    epochs = [np.concatenate([next(it)["chosen_targets"] for _ in range(2)]) for _ in range(2)]
    assert sorted(map(bytes, epochs[0])) == sorted(map(bytes, epochs[1]))  # each epoch sees every pair once


def test_dpo_step_over_micro_batches_equals_one_batch_with_a_padding_pair(trained_run):
    """`train.grad_accum` splits a step's pairs into micro-batches: the loss, accuracy and gradient are still
    means over the step's real pairs (a padding pair, all zeros, counts in none of them)."""
    import functools

    import jax

    from lmjax.model.params import abstract_model, init_params
    from lmjax.parallel.rules import path_names
    from lmjax.train.dpo import dpo_step
    from lmjax.train.optim import make_optimizer
    from lmjax.train.step import start_state

    tokenizer = Tokenizer.load(trained_run[0] / "tokenizer")
    chunks, _ = pair_chunks(_pairs(range(4)), tokenizer, seq_len=64)
    batch = next(pair_batches(chunks, 64, 4, seed=0))
    batch = {k: np.concatenate([v[:3], np.zeros_like(v[:1])]) for k, v in batch.items()}  # pair 4 pads
    cfg = tiny_config("train.lr=1e-2", "train.warmup_steps=0")
    cfg.model.vocab_size = tokenizer.vocab_size
    graphdef, _, _ = abstract_model(cfg.model)
    tx = make_optimizer(cfg.train)
    state = start_state(init_params(cfg.model, jax.random.PRNGKey(0)), tx, 0)
    ref = init_params(cfg.model, jax.random.PRNGKey(1))
    step = jax.jit(functools.partial(dpo_step, graphdef=graphdef, tx=tx, beta=0.1))
    s1, m1 = step(state, ref, {k: v.reshape(1, 4, -1) for k, v in batch.items()})
    s2, m2 = step(state, ref, {k: v.reshape(2, 2, -1) for k, v in batch.items()})
    assert float(m1["pairs"]) == float(m2["pairs"]) == 3
    for key in ("loss", "accuracy", "margin"):
        assert float(m1[key]) == pytest.approx(float(m2[key]), rel=1e-5, abs=1e-7), key
    moments = lambda s: [x for path, x in jax.tree_util.tree_flatten_with_path(s["opt_state"])[0]
                         if "mu" in path_names(path)]
    assert moments(s1)
    for a, b in zip(moments(s1), moments(s2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-8)


def test_dpo_raises_held_out_margin_and_accuracy(trained_run, tmp_path):
    from lmjax.train.loop import train

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _pairs(range(80))))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(p) + "\n" for p in _pairs(range(1000, 1016))))
    overrides = ["train.objective=dpo", "train.dpo_beta=0.1", "train.steps=30", "train.lr=3e-3",
                 "train.eval_every=0", "train.samples=", f"init_from={trained_run[0]}",
                 f"data.train=pairs:{data}", f"data.val=pairs:{val}"]
    with pytest.raises(ConfigError, match="needs init_from"):
        train(tiny_config(*overrides, "init_from="), tmp_path / "bad")
    result = train(tiny_config(*overrides, "train.steps=1", "train.lr=1e-9"), tmp_path / "initial")
    initial = {k: result[k] for k in ("val_accuracy", "val_margin")}
    result = train(tiny_config(*overrides), tmp_path / "dpo")
    print("initial", initial, "after DPO", {k: result[k] for k in ("val_accuracy", "val_margin", "val_loss")})
    assert abs(initial["val_margin"]) < 0.05 and result["val_margin"] > initial["val_margin"] + 1.0
    assert result["val_accuracy"] > max(initial["val_accuracy"], 0.9)
    assert result["val_loss"] < math.log(2)
    # MFU counts the frozen reference's forward too: 8N of model FLOPs per token, not training's 6N.
    from lmjax.model.params import abstract_model, flops_per_token
    from lmjax.run.workdir import Workdir, read_metrics

    cfg = Workdir(tmp_path / "dpo").load_config()
    record = [r for r in read_metrics(Workdir(tmp_path / "dpo").metrics_path) if "mfu" in r][-1]
    flops = flops_per_token(cfg.model, abstract_model(cfg.model)[1]) * 4 / 3
    assert record["mfu"] == pytest.approx(record["tokens_per_sec"] * flops / (cfg.train.peak_tflops * 1e12))


def test_feedback_export_round_trip(tmp_path, capsys):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    prompt = [{"role": "user", "content": "What does len do?"}]
    good = store.record_reply(prompt, "It counts items.")
    bad = store.record_reply(prompt, "It sorts.")
    store.rate(good, 1)
    store.rate(bad, -1)
    store.edit(bad, "It returns the number of items.")
    store.close()
    out = tmp_path / "prefs.jsonl"
    assert main(["feedback", "export", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert "wrote 2 preference pairs" in capsys.readouterr().out
    assert read_pairs(str(out)) == [
        {"prompt": prompt, "chosen": "It counts items.", "rejected": "It sorts."},
        {"prompt": prompt, "chosen": "It returns the number of items.", "rejected": "It sorts."}]
    assert main(["feedback", "export", "--workdir", str(tmp_path / "none"), "--out", str(out)]) == 2
