"""Token chunks -> packed, checkpointable grain batches for language-model training.

A batch is a dict of int32 arrays shaped [batch, seq_len]:
    inputs       token ids (chunk[:-1]), 0 on padding
    targets      next-token ids (chunk[1:]), 0 on padding
    segment_ids  1, 2, ... per packed document chunk within a row, 0 on padding
    positions    0-based position within each segment, 0 on padding
The loss mask is `segment_ids != 0`; attention must not cross segment boundaries.
"""

import itertools
from collections.abc import Iterable, Iterator

import grain
import numpy as np

from lmjax.data.tokenizer import Tokenizer

ENCODE_BATCH = 512  # documents per encode_batch call
PACKING_BINS_PER_ROW = 4  # first-fit packing looks at this many candidate rows per batch row
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> list[np.ndarray]:
    """Encode each document as [bos] + ids + [eos] and cut it into chunks of <= seq_len + 1 tokens.

    Chunk k is tokens[k * seq_len : k * seq_len + seq_len + 1]: consecutive chunks share
    one token, so every token but the first is a prediction target exactly once.
    """
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    chunks = []
    for batch in _batched(docs, ENCODE_BATCH):
        for ids in tokenizer.encode_batch(batch):
            tokens = np.array([bos, *ids, eos], dtype=np.int32)
            chunks += [tokens[k : k + seq_len + 1] for k in range(0, len(tokens) - 1, seq_len)]
    return chunks


def _split_chunk(chunk: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": chunk[:-1], "targets": chunk[1:]}


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "segment_ids": packed["inputs_segment_ids"],
        "positions": packed["inputs_positions"],
    }


def _packed(ds: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle: bool) -> grain.IterDataset:
    """First-fit pack {inputs, targets} elements into rows of seq_len tokens."""
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle,
    )
    return ds.map(_to_row)


def _check_chunks(chunks: list[np.ndarray], seq_len: int) -> None:
    if not chunks:
        raise ValueError("no token chunks: the data source produced no documents")
    longest = max(len(c) for c in chunks)
    if longest > seq_len + 1:
        raise ValueError(f"a chunk has {longest} tokens, more than seq_len + 1 = {seq_len + 1}")


def train_iterator(
    chunks: list[np.ndarray],
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless iterator of packed [batch_size, seq_len] batches for this process.

    The chunks are sharded by process ([process_index::process_count]), reshuffled
    every epoch from `seed`, first-fit packed into rows and batched. The iterator
    supports get_state()/set_state() and grain.checkpoint.CheckpointSave/Restore.
    """
    _check_chunks(chunks, seq_len)
    ds = grain.MapDataset.source(chunks)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no chunks out of {len(chunks)}")
    ds = ds.seed(seed).shuffle().repeat(None).map(_split_chunk)
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))  # prefetch threads cost more than they save
    ids = _packed(ids, seq_len, PACKING_BINS_PER_ROW * batch_size, seed, shuffle=True)
    return iter(ids.batch(batch_size, drop_remainder=True))


def eval_batches(
    chunks: list[np.ndarray],
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches (no shuffling), at most `num_batches` of them.

    All chunks are packed in order, then packed rows are dealt out to processes
    ([process_index::process_count]); every process gets the same number of batches,
    the last one padded with all-zero rows where the data runs out.
    """
    _check_chunks(chunks, seq_len)
    ds = grain.MapDataset.source(chunks).map(_split_chunk).to_iter_dataset(grain.ReadOptions(num_threads=0))
    global_batch = batch_size * process_count
    packed = _packed(ds, seq_len, global_batch, seed=0, shuffle=False)
    rows = list(itertools.islice(packed, num_batches * global_batch))
    n_batches = -(-len(rows) // global_batch)
    rows = rows[process_index::process_count]
    pad_row = {k: np.zeros(seq_len, dtype=np.int32) for k in BATCH_KEYS}
    rows += [pad_row] * (n_batches * batch_size - len(rows))
    return [
        {k: np.stack([r[k] for r in rows[b * batch_size : (b + 1) * batch_size]]) for k in BATCH_KEYS}
        for b in range(n_batches)
    ]
