"""Reference points a trained model must beat."""

import math

import numpy as np

from lmjax.data.pipeline import chunk_tokens


def unigram_bpb(train_chunks: list[np.ndarray], val_chunks: list[np.ndarray], token_bytes: np.ndarray) -> float:
    """Bits per byte on the validation targets of a unigram model fitted to the training targets
    (add-one smoothing): what a model that ignores context achieves. (For chat chunks all targets count,
    not only the assistant's.)"""
    vocab = len(token_bytes)
    counts = np.ones(vocab, np.float64)
    for chunk in train_chunks:
        counts += np.bincount(chunk_tokens(chunk)[1:], minlength=vocab)[:vocab]
    log2_p = np.log2(counts / counts.sum())
    val_targets = np.concatenate([chunk_tokens(c)[1:] for c in val_chunks]) if val_chunks else np.zeros(0, np.int64)
    total_bytes = token_bytes[val_targets].sum()
    return float(-log2_p[val_targets].sum() / max(total_bytes, 1)) if len(val_targets) else math.nan
