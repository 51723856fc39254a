"""Reference points a trained model must beat."""

import math

import numpy as np


def _targets(chunks: list[np.ndarray]) -> np.ndarray:
    """The counted prediction targets of token chunks: every token but the first, or, for chat chunks
    ([2, n]: tokens and loss mask), only those whose loss mask is 1 (the assistant's replies)."""
    parts = [c[1:] if c.ndim == 1 else c[0, 1:][c[1, 1:] == 1] for c in chunks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def unigram_bpb(train_chunks: list[np.ndarray], val_chunks: list[np.ndarray], token_bytes: np.ndarray) -> float:
    """Bits per byte on the validation targets of a unigram model fitted to the training targets (add-one
    smoothing): what a model that ignores context achieves. Counts the same targets as the model's
    validation loss (only the assistant's tokens in chat data)."""
    vocab = len(token_bytes)
    return unigram_bpb_from_counts(target_counts(train_chunks, vocab), target_counts(val_chunks, vocab), token_bytes)


def target_counts(chunks: list[np.ndarray], vocab: int) -> np.ndarray:
    """How often each token id is a counted prediction target in `chunks`."""
    return np.bincount(_targets(chunks), minlength=vocab)


def unigram_bpb_from_counts(train_counts: np.ndarray, val_counts: np.ndarray, token_bytes: np.ndarray) -> float:
    """`unigram_bpb` from the targets' counts per token id (as token shards' manifests keep them)."""
    vocab = len(token_bytes)
    counts = np.ones(vocab, np.float64)
    counts[: min(vocab, len(train_counts))] += train_counts[:vocab]
    log2_p = np.log2(counts / counts.sum())
    val = np.zeros(vocab, np.float64)
    val[: min(vocab, len(val_counts))] = val_counts[:vocab]
    total_bytes = (val * token_bytes).sum()
    return float(-(val * log2_p).sum() / max(total_bytes, 1)) if val.sum() else math.nan
