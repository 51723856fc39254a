"""Chat template, assistant-only loss masks, packing conversations, and supervised fine-tuning."""

import json

import numpy as np
import pytest
from conftest import tiny_config

from lmjax.config import ConfigError
from lmjax.input.chunks import tokenize_conversations
from lmjax.input.packing import train_iterator
from lmjax.text.chat_template import encode_chat, read_conversations, write_conversations
from lmjax.text.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does len do?"},
    {"role": "assistant", "content": "It returns the number of items."},
    {"role": "user", "content": "And abs?"},
    {"role": "assistant", "content": "The absolute value."},
]


@pytest.fixture(scope="module")
def tokenizer(trained_run) -> Tokenizer:
    return Tokenizer.load(trained_run[0] / "tokenizer")


def test_loss_mask_covers_exactly_the_assistant_replies_and_their_end(tokenizer):
    ids, mask = encode_chat(CONVERSATION, tokenizer)
    special = tokenizer.special_ids
    assert ids[0] == tokenizer.bos_id and len(ids) == len(mask)
    learned = tokenizer.decode(ids[mask == 1])
    assert learned == "It returns the number of items.The absolute value."
    ends = np.flatnonzero(ids == special["<|end|>"])
    assert list(mask[ends]) == [0, 0, 1, 0, 1]
    prompt, prompt_mask = encode_chat(CONVERSATION[:2], tokenizer, add_generation_prompt=True)
    assert prompt[-1] == special["<|assistant|>"] and not prompt_mask.any()


def test_long_conversations_keep_whole_turns(tokenizer):
    full = len(encode_chat(CONVERSATION, tokenizer)[0])
    three_turns = len(encode_chat(CONVERSATION[:3], tokenizer)[0])
    (chunk,) = tokenize_conversations([CONVERSATION], tokenizer, seq_len=full - 2)
    assert chunk.shape == (2, three_turns)
    assert tokenize_conversations([CONVERSATION], tokenizer, seq_len=8) == []


def test_packed_chat_batches_carry_the_loss_mask(tokenizer):
    chunks = tokenize_conversations([CONVERSATION] * 20, tokenizer, seq_len=64)
    batch = next(train_iterator(chunks, 64, 4, seed=0))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert batch["loss_mask"].sum() > 0 and not (batch["loss_mask"] & (batch["segment_ids"] == 0)).any()
    learned = tokenizer.decode(batch["targets"][0][batch["loss_mask"][0] == 1])
    assert "It returns the number of items." in learned and "What does" not in learned


def test_conversation_files_round_trip_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "c.jsonl"
    write_conversations([CONVERSATION], path)
    assert list(read_conversations(path)) == [CONVERSATION]
    path.write_text(path.read_text() + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: message 0"):
        list(read_conversations(path))


def test_sft_starts_from_the_pretrained_run_and_learns_the_replies(trained_run, tmp_path):
    """Fine-tuned on questions about items 0-63, the model answers those about items 64-79 (never seen) too."""
    from lmjax.train.loop import train

    def conversations(items):
        return [[{"role": "user", "content": f"What is item {i}?"},
                 {"role": "assistant", "content": f"Item {i} is a number."}] for i in items]

    data, heldout = tmp_path / "chat.jsonl", tmp_path / "heldout.jsonl"
    write_conversations(conversations(range(64)), data)
    write_conversations(conversations(range(64, 80)), heldout)
    overrides = ["train.steps=30", "train.eval_every=0", "train.samples=", "train.lr=1e-2",
                 f"init_from={trained_run[0]}", f"data.train=chat:{data}", f"data.val=chat:{heldout}"]
    result = train(tiny_config(*overrides), tmp_path / "sft")
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert result["val_loss"] < 0.5 * records[0]["train_loss"], records
    assert result["val_bpb"] < result["unigram_bpb"], result
    assert (tmp_path / "sft" / "tokenizer" / "tokenizer.model").read_bytes() == \
        (trained_run[0] / "tokenizer" / "tokenizer.model").read_bytes()
    with pytest.raises(ConfigError, match="different model: d_model 64 \\(there\\) != 32 \\(here\\)"):
        train(tiny_config(*overrides, "model.d_model=32"), tmp_path / "bad")
