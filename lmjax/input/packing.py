"""Token chunks -> packed, checkpointable grain batches for language-model training.

A batch is a dict of int32 arrays shaped [batch, seq_len]:
    inputs       token ids (chunk[:-1]), 0 on padding
    targets      next-token ids (chunk[1:]), 0 on padding
    segment_ids  1, 2, ... per packed document chunk within a row, 0 on padding
    positions    0-based position within each segment, 0 on padding
    loss_mask    (chat data only) 1 where the target is a token to learn, i.e. an assistant's reply
Without `loss_mask` every non-padding target counts; attention must not cross segment boundaries.

A chunk is an int32 array of tokens [n], or [2, n] of tokens and a per-token loss mask (chat).
"""

import itertools
from collections.abc import Sequence

import grain
import numpy as np

from lmjax.config import DataError

PACKING_BINS_PER_ROW = 4  # first-fit packing looks at this many candidate rows per batch row


def _split_chunk(chunk: np.ndarray) -> dict[str, np.ndarray]:
    if chunk.ndim == 1:
        return {"inputs": chunk[:-1], "targets": chunk[1:]}
    return {"inputs": chunk[0, :-1], "targets": chunk[0, 1:], "loss_mask": chunk[1, 1:]}


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "segment_ids": packed["inputs_segment_ids"],
        "positions": packed["inputs_positions"],
    }
    if "loss_mask" in packed:
        row["loss_mask"] = packed["loss_mask"]
    return row


def _packed(ds: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle: bool,
            masked: bool = False) -> grain.IterDataset:
    """First-fit pack {inputs, targets[, loss_mask]} elements into rows of seq_len tokens."""
    lengths = {"inputs": seq_len, "targets": seq_len, **({"loss_mask": seq_len} if masked else {})}
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct=lengths,
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle,
    )
    return ds.map(_to_row)


def _check_chunks(chunks: Sequence[np.ndarray], seq_len: int) -> None:
    """DataError for no chunks, ValueError for a chunk too long; token shards (which carry the seq_len they
    were cut for) are checked by that, not read."""
    if not len(chunks):
        raise DataError("no token chunks: the data source produced no documents")
    if hasattr(chunks, "seq_len"):
        if chunks.seq_len != seq_len:
            raise ValueError(f"the chunks were cut for seq_len {chunks.seq_len}, not {seq_len}")
        return
    longest = max(c.shape[-1] for c in chunks)
    if longest > seq_len + 1:
        raise ValueError(f"a chunk has {longest} tokens, more than seq_len + 1 = {seq_len + 1}")


def train_iterator(
    chunks: Sequence[np.ndarray],
    seq_len: int,
    batch_size: int,
    seed: int,
    loader_index: int = 0,
    loader_count: int = 1,
) -> grain.DatasetIterator:
    """Endless iterator of packed [batch_size, seq_len] batches of data loader `loader_index`.

    `chunks` is a list or a random-access source (lmjax/input/tokens.py: `TokenChunks`), read by index.
    The chunks are sharded by loader ([loader_index::loader_count]), reshuffled
    every epoch from `seed`, first-fit packed into rows and batched. The iterator
    supports get_state()/set_state() and grain.checkpoint.CheckpointSave/Restore.
    """
    _check_chunks(chunks, seq_len)
    ds = grain.MapDataset.source(chunks)[loader_index::loader_count]
    if len(ds) == 0:
        raise DataError(f"data loader {loader_index} of {loader_count} gets no chunks out of {len(chunks)}")
    ds = ds.seed(seed).shuffle().repeat(None).map(_split_chunk)
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))  # prefetch threads cost more than they save
    ids = _packed(ids, seq_len, PACKING_BINS_PER_ROW * batch_size, seed, shuffle=True, masked=chunks[0].ndim == 2)
    return iter(ids.batch(batch_size, drop_remainder=True))


def eval_batches(
    chunks: Sequence[np.ndarray],
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches (no shuffling), at most `num_batches` of them.

    Chunks are read and packed in order until there are enough rows, then packed rows are dealt out to processes
    ([process_index::process_count]); every process gets the same number of batches,
    the last one padded with all-zero rows where the data runs out.
    """
    _check_chunks(chunks, seq_len)
    ds = grain.MapDataset.source(chunks).map(_split_chunk).to_iter_dataset(grain.ReadOptions(num_threads=0))
    global_batch = batch_size * process_count
    packed = _packed(ds, seq_len, global_batch, seed=0, shuffle=False, masked=chunks[0].ndim == 2)
    return deal_rows(list(itertools.islice(packed, num_batches * global_batch)), batch_size, process_index,
                     process_count)


def deal_rows(rows: list[dict[str, np.ndarray]], batch_size: int, process_index: int = 0,
              process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """This process's evaluation batches of `rows` (dealt out as [process_index::process_count]): every
    process gets the same number of batches, the last one padded with all-zero rows (which count as nothing)."""
    n_batches = -(-len(rows) // (batch_size * process_count))
    rows = rows[process_index::process_count]
    rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (n_batches * batch_size - len(rows))
    return [{k: np.stack([r[k] for r in rows[b * batch_size : (b + 1) * batch_size]]) for k in rows[0]}
            for b in range(n_batches)]
