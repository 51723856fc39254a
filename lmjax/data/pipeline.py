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
from collections.abc import Iterable, Iterator

import grain
import numpy as np

from lmjax.data.chat import encode_chat
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


def tokenize_conversations(conversations: Iterable[list[dict]], tokenizer: Tokenizer,
                           seq_len: int) -> list[np.ndarray]:
    """Encode conversations with the chat template into [2, n] chunks of (tokens, loss mask). A
    conversation longer than seq_len + 1 tokens keeps its longest prefix that ends with an assistant
    reply and fits (conversations whose first assistant reply does not fit are dropped)."""
    chunks = []
    for messages in conversations:
        for end in range(len(messages), 0, -1):
            if messages[end - 1]["role"] != "assistant":
                continue
            ids, mask = encode_chat(messages[:end], tokenizer)
            if len(ids) <= seq_len + 1:
                chunks.append(np.stack([ids, mask]))
                break
    return chunks


def chunk_tokens(chunk: np.ndarray) -> np.ndarray:
    """The token ids of a chunk (dropping the loss-mask row of chat chunks)."""
    return chunk if chunk.ndim == 1 else chunk[0]


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


def _check_chunks(chunks: list[np.ndarray], seq_len: int) -> None:
    if not chunks:
        raise ValueError("no token chunks: the data source produced no documents")
    longest = max(c.shape[-1] for c in chunks)
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
    ids = _packed(ids, seq_len, PACKING_BINS_PER_ROW * batch_size, seed, shuffle=True, masked=chunks[0].ndim == 2)
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
    masked = chunks[0].ndim == 2
    packed = _packed(ds, seq_len, global_batch, seed=0, shuffle=False, masked=masked)
    rows = list(itertools.islice(packed, num_batches * global_batch))
    n_batches = -(-len(rows) // global_batch)
    rows = rows[process_index::process_count]
    keys = BATCH_KEYS + (("loss_mask",) if masked else ())
    pad_row = {k: np.zeros(seq_len, dtype=np.int32) for k in keys}
    rows += [pad_row] * (n_batches * batch_size - len(rows))
    return [
        {k: np.stack([r[k] for r in rows[b * batch_size : (b + 1) * batch_size]]) for k in keys}
        for b in range(n_batches)
    ]
