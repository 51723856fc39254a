"""Documents and conversations -> token chunks of at most seq_len + 1 tokens (the unit packing works on).

A chunk is an int32 array of tokens [n], or [2, n] of tokens and a per-token loss mask (chat).
"""

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from lmjax.text.chat_template import encode_chat
from lmjax.text.tokenizer import Tokenizer

ENCODE_BATCH = 512  # documents per encode_batch call


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
