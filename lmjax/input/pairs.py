"""Preference pairs for DPO: reading, holding out by prompt, encoding and batching.

A pair is {"prompt": messages, "chosen": text, "rejected": text} (the format of `lmjax feedback
export`). Each reply is encoded after its prompt with the chat template into one chunk per pair (what
token shards store, `pair_chunk`), and a chunk into one row (`pair_row`): one sequence per side (no
packing), left-aligned and padded; only the reply tokens count in the loss. A row holds `chosen_*` and
`rejected_*` versions of the usual batch arrays (`inputs`, `targets`, `segment_ids`, `positions`,
`loss_mask`).
"""

import functools
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
LOSS, REJECTED = 1, 2  # flags in row 1 of a pair chunk: a reply token to score; a token of the rejected side
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


def pair_chunk(pair: Pair, tokenizer: Tokenizer, seq_len: int) -> np.ndarray | None:
    """`pair` as one [2, n] chunk: row 0 the chosen sequence's tokens then the rejected one's (each is the prompt
    and its reply, encoded with the chat template), row 1 per token `LOSS` where the token is a reply token
    to score, plus `REJECTED` on the rejected sequence; None if a side is longer than seq_len + 1 tokens.
    This is what token shards of preference pairs hold, one chunk per record."""
    prompt, _ = encode_chat(pair["prompt"], tokenizer, add_generation_prompt=True)
    parts = []
    for flag, side in zip((0, REJECTED), SIDES, strict=True):
        ids, mask = encode_chat([*pair["prompt"], {"role": "assistant", "content": pair[side]}], tokenizer)
        if not np.array_equal(ids[: len(prompt)], prompt):
            raise ValueError(f"the chat template encoded the prompt of a pair differently on its own than before "
                             f"its {side} reply; the loss mask would be wrong")
        if len(ids) - 1 > seq_len:
            return None
        mask[: len(prompt)] = 0
        parts.append(np.stack([ids, mask * LOSS + flag]))
    return np.concatenate(parts, axis=1).astype(np.int32)


def pair_row(chunk: np.ndarray, seq_len: int) -> Row:
    """The training row of a pair chunk: `chosen_*` and `rejected_*` arrays of length `seq_len`, the loss mask
    on the reply only."""
    rejected = (chunk[1] & REJECTED) > 0
    row = {}
    for side, (ids, flags) in zip(SIDES, (chunk[:, ~rejected], chunk[:, rejected]), strict=True):
        n = len(ids) - 1
        pad = (0, seq_len - n)
        row |= {f"{side}_inputs": np.pad(ids[:-1], pad), f"{side}_targets": np.pad(ids[1:], pad),
                f"{side}_segment_ids": np.pad(np.ones(n, np.int32), pad),
                f"{side}_positions": np.pad(np.arange(n, dtype=np.int32), pad),
                f"{side}_loss_mask": np.pad(flags[1:] & LOSS, pad)}
    return row


def pair_chunks(pairs: Sequence[Pair], tokenizer: Tokenizer, seq_len: int) -> tuple[list[np.ndarray], int]:
    """(chunks of the pairs that fit seq_len, in memory; number of pairs dropped because a side is too long)."""
    chunks = [pair_chunk(p, tokenizer, seq_len) for p in pairs]
    kept = [c for c in chunks if c is not None]
    return kept, len(chunks) - len(kept)


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, seq_len: int) -> tuple[list[Row], int]:
    """(rows of the pairs that fit seq_len, number of pairs dropped because a side is too long)."""
    chunks, dropped = pair_chunks(pairs, tokenizer, seq_len)
    return [pair_row(c, seq_len) for c in chunks], dropped


def pair_batches(chunks: Sequence[np.ndarray], seq_len: int, batch_size: int, seed: int, loader_index: int = 0,
                 loader_count: int = 1) -> grain.DatasetIterator:
    """Endless iterator of [batch_size, seq_len] batches of data loader `loader_index`'s share of the pair
    `chunks` (in memory or read lazily from token shards), reshuffled every epoch from `seed`; deterministic,
    with get_state()/set_state()."""
    ds = grain.MapDataset.source(chunks)[loader_index::loader_count]
    if len(ds) < batch_size:
        raise DataError(f"{len(ds)} preference pairs that fit seq_len in data loader {loader_index}, "
                        f"fewer than its batch of {batch_size}")
    ds = ds.seed(seed).shuffle().map(functools.partial(pair_row, seq_len=seq_len)).repeat(None)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(batch_size, drop_remainder=True))


def eval_pair_batches(chunks: Sequence[np.ndarray], seq_len: int, batch_size: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[Row]:
    """Deterministic batches of the first `num_batches * batch_size * process_count` held-out pair chunks,
    dealt out to processes; the last batch is padded with all-zero rows (which count as no pair)."""
    if not len(chunks):
        raise DataError("no held-out preference pair fits seq_len")
    first = range(min(len(chunks), num_batches * batch_size * process_count))
    return deal_rows([pair_row(chunks[i], seq_len) for i in first], batch_size, process_index, process_count)
