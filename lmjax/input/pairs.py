"""Preference pairs for DPO: reading, holding out by prompt, encoding and batching.

A pair is {"prompt": messages, "chosen": text, "rejected": text} (the format of `lmjax feedback
export`). Each reply is encoded after its prompt with the chat template, one sequence per row (no
packing), left-aligned and padded; only the reply tokens count in the loss. A row holds `chosen_*` and
`rejected_*` versions of the usual batch arrays (`inputs`, `targets`, `segment_ids`, `positions`,
`loss_mask`).
"""

import glob
import json
from collections.abc import Sequence

import grain
import numpy as np

from lmjax.config import DataError
from lmjax.input.packing import deal_rows
from lmjax.text.chat_template import check_conversation, encode_chat
from lmjax.text.io import hash_unit, read_jsonl
from lmjax.text.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")
HELDOUT_FRACTION = 0.1  # share of prompts held out when data.val is ""
Pair = dict
Row = dict[str, np.ndarray]


def read_pairs(pattern: str) -> list[Pair]:
    """Preference pairs from the JSONL files matching `pattern`; a malformed line raises `DataError`."""
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise DataError(f"preference source pairs:{pattern}: no files match")
    pairs = []
    for path in files:
        for where, pair in read_jsonl(path):
            if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in SIDES):
                raise DataError(f'{where}: expected {{"prompt": messages, "chosen": str, "rejected": str}}')
            check_conversation(pair.get("prompt"), where)
            pairs.append(pair)
    return pairs


def prompt_key(pair: Pair) -> str:
    """The prompt as canonical JSON: pairs that share it are held out together."""
    return json.dumps(pair["prompt"], sort_keys=True, ensure_ascii=False)


def split_heldout(pairs: Sequence[Pair], fraction: float = HELDOUT_FRACTION) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) by a hash of each pair's prompt, so every pair of one prompt (feedback export makes
    every liked x disliked reply of a conversation) lands on the same side."""
    heldout = [hash_unit(prompt_key(p)) < fraction for p in pairs]
    return ([p for p, h in zip(pairs, heldout, strict=True) if not h],
            [p for p, h in zip(pairs, heldout, strict=True) if h])


def encode_pair(pair: Pair, tokenizer: Tokenizer, seq_len: int) -> Row | None:
    """One row for `pair`: `chosen_*` and `rejected_*` arrays of length `seq_len`, the loss mask on the reply
    only; None if a side is longer than seq_len + 1 tokens."""
    prompt, _ = encode_chat(pair["prompt"], tokenizer, add_generation_prompt=True)
    row = {}
    for side in SIDES:
        ids, mask = encode_chat([*pair["prompt"], {"role": "assistant", "content": pair[side]}], tokenizer)
        if not np.array_equal(ids[: len(prompt)], prompt):
            raise ValueError(f"the chat template encoded the prompt of a pair differently on its own than before "
                             f"its {side} reply; the loss mask would be wrong")
        mask[: len(prompt)] = 0
        n = len(ids) - 1
        if n > seq_len:
            return None
        pad = (0, seq_len - n)
        row |= {f"{side}_inputs": np.pad(ids[:-1], pad), f"{side}_targets": np.pad(ids[1:], pad),
                f"{side}_segment_ids": np.pad(np.ones(n, np.int32), pad),
                f"{side}_positions": np.pad(np.arange(n, dtype=np.int32), pad),
                f"{side}_loss_mask": np.pad(mask[1:], pad)}
    return row


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, seq_len: int) -> tuple[list[Row], int]:
    """(rows of the pairs that fit seq_len, number of pairs dropped because a side is too long)."""
    rows = [encode_pair(p, tokenizer, seq_len) for p in pairs]
    kept = [r for r in rows if r is not None]
    return kept, len(rows) - len(kept)


def pair_batches(rows: list[Row], batch_size: int, seed: int, loader_index: int = 0,
                 loader_count: int = 1) -> grain.DatasetIterator:
    """Endless iterator of [batch_size, seq_len] batches of data loader `loader_index`'s share of the encoded
    pairs `rows`, reshuffled every epoch from `seed`; deterministic, with get_state()/set_state()."""
    rows = rows[loader_index::loader_count]
    if len(rows) < batch_size:
        raise DataError(f"{len(rows)} preference pairs that fit seq_len in data loader {loader_index}, "
                        f"fewer than its batch of {batch_size}")
    ds = grain.MapDataset.source(rows).seed(seed).shuffle().repeat(None)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(batch_size, drop_remainder=True))


def eval_pair_batches(rows: list[Row], batch_size: int, num_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[Row]:
    """Deterministic batches of at most `num_batches * batch_size * process_count` encoded held-out pairs,
    dealt out to processes; the last batch is padded with all-zero rows (which count as no pair)."""
    if not rows:
        raise DataError("no held-out preference pair fits seq_len")
    return deal_rows(rows[: num_batches * batch_size * process_count], batch_size, process_index, process_count)
