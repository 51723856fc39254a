"""Preference tuning: the DPO loss, pair batches, DPO from a pretrained run, and exporting feedback."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lmjax.cli import main
from lmjax.config import ConfigError
from lmjax.data.tokenizer import Tokenizer
from lmjax.serve.feedback import FeedbackStore
from lmjax.train.dpo import dpo_loss, encode_pairs, pair_batches, read_pairs


def _pairs(items) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is item {i}?"}],
             "chosen": f"Item {i} is a number, thank you for asking.", "rejected": "No. Go away."} for i in items]


def test_dpo_loss_known_values():
    loss, m = dpo_loss(jnp.array([-1.0, -4.0]), jnp.array([-3.0, -2.0]), jnp.array([-2.0, -2.0]),
                       jnp.array([-2.0, -2.0]), beta=0.5)
    margins = np.array([2.0, -2.0])  # (-1 + 2) - (-3 + 2), (-4 + 2) - (-2 + 2)
    expected = np.mean([math.log1p(math.exp(-0.5 * x)) for x in margins])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == pytest.approx(0.0)
    loss0, m0 = dpo_loss(*(jnp.zeros(3),) * 4, beta=0.1)
    assert float(loss0) == pytest.approx(math.log(2)) and float(m0["accuracy"]) == 0.0


def test_pair_rows_mask_only_the_reply_and_batches_are_deterministic(trained_run):
    tokenizer = Tokenizer.load(trained_run[0] / "tokenizer")
    pairs = _pairs(range(10)) + [{"prompt": [{"role": "user", "content": "x " * 100}], "chosen": "a", "rejected": "b"}]
    rows = encode_pairs(pairs, tokenizer, seq_len=64)
    assert len(rows) == 10  # the long one is dropped
    row = rows[3]
    assert tokenizer.decode(row["chosen_targets"][row["chosen_loss_mask"] == 1]) == pairs[3]["chosen"]
    assert tokenizer.decode(row["rejected_targets"][row["rejected_loss_mask"] == 1]) == "No. Go away."
    assert row["chosen_inputs"][0] == tokenizer.bos_id and not row["chosen_segment_ids"][-1]
    first = [next(pair_batches(rows, 4, seed=1))["chosen_inputs"] for _ in range(2)]
    np.testing.assert_array_equal(*first)
    it = pair_batches(rows, 5, seed=1)
    epochs = [np.concatenate([next(it)["chosen_targets"] for _ in range(2)]) for _ in range(2)]
    assert sorted(map(bytes, epochs[0])) == sorted(map(bytes, epochs[1]))  # each epoch sees every pair once


def test_dpo_raises_held_out_margin_and_accuracy(trained_run, tmp_path):
    from lmjax.train.loop import train

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _pairs(range(80))))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(p) + "\n" for p in _pairs(range(1000, 1016))))
    overrides = ["train.objective=dpo", "train.dpo_beta=0.1", "train.steps=30", "train.lr=3e-3",
                 "train.eval_every=0", "train.samples=", f"init_from={trained_run[0]}",
                 f"data.train=jsonl:{data}", f"data.val=jsonl:{val}"]
    with pytest.raises(ConfigError, match="needs init_from"):
        train(tiny_config(*overrides, "init_from="), tmp_path / "bad")
    result = train(tiny_config(*overrides, "train.steps=1", "train.lr=1e-9"), tmp_path / "initial")
    initial = {k: result[k] for k in ("val_accuracy", "val_margin")}
    result = train(tiny_config(*overrides), tmp_path / "dpo")
    print("initial", initial, "after DPO", {k: result[k] for k in ("val_accuracy", "val_margin", "val_loss")})
    assert abs(initial["val_margin"]) < 0.05 and result["val_margin"] > initial["val_margin"] + 1.0
    assert result["val_accuracy"] > max(initial["val_accuracy"], 0.9)
    assert result["val_loss"] < math.log(2)


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
    assert read_pairs(f"jsonl:{out}") == [
        {"prompt": prompt, "chosen": "It counts items.", "rejected": "It sorts."},
        {"prompt": prompt, "chosen": "It returns the number of items.", "rejected": "It sorts."}]
    assert main(["feedback", "export", "--workdir", str(tmp_path / "none"), "--out", str(out)]) == 2
