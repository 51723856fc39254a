"""The grammar of `data.train` and `data.val`, parsed in this one place.

    SOURCE                     documents: stdlib, stdlib:val, text:GLOB, jsonl:GLOB[:FIELD], parquet:..., tfds:...,
                               mix:..., or a `lmjax data prepare` directory DIR[:train|:val]
                               (lmjax/corpus/sources.py has the document grammar)
    chat:stdlib[:heldout]      the embedded chat dataset (conversations, loss on the assistant's replies)
    chat:GLOB                  conversations from JSONL files ({"messages": [{"role", "content"}, ...]})
    pairs:GLOB                 preference pairs from JSONL ({"prompt", "chosen", "rejected"}), for DPO
"""

import glob
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmjax.config import DataError
from lmjax.corpus.cda import counterfactual
from lmjax.corpus.shards import parse_prepared
from lmjax.corpus.sources import read_documents
from lmjax.input.chunks import tokenize_conversations, tokenize_documents
from lmjax.input.pairs import Pair, read_pairs
from lmjax.text.chat_template import Message, read_conversations
from lmjax.text.tokenizer import Tokenizer

KINDS = ("documents", "chat", "pairs")


class DataSpec(NamedTuple):
    kind: str  # one of KINDS
    source: str  # the spec without its kind prefix


def parse_spec(spec: str) -> DataSpec:
    """The kind of data `spec` names; `DataError` for an empty spec or an empty chat:/pairs: source."""
    if not spec:
        raise DataError("empty data spec: set data.train (and data.val)")
    for kind in ("chat", "pairs"):
        if spec.startswith(f"{kind}:"):
            source = spec[len(kind) + 1:]
            if not source:
                raise DataError(f"data spec {spec!r} names no source")
            return DataSpec(kind, source)
    return DataSpec("documents", spec)


def read_chat(source: str) -> list[list[Message]]:
    """Conversations of a chat source: `stdlib` / `stdlib:heldout` (the embedded dataset) or a JSONL glob."""
    if source in ("stdlib", "stdlib:train", "stdlib:heldout"):
        from lmjax.corpus.stdlib_chat import build_chat_dataset  # building it imports the whole stdlib: lazily

        return build_chat_dataset()["heldout" if source.endswith("heldout") else "train"]
    files = sorted(glob.glob(source, recursive=True))
    if not files:
        raise DataError(f"chat source {source!r}: no files match; use chat:stdlib, chat:stdlib:heldout or chat:GLOB")
    return [c for path in files for c in read_conversations(path)]


def load_chunks(spec: str, tokenizer: Tokenizer, seq_len: int, cda: bool = False) -> list[np.ndarray]:
    """Training chunks of a documents or chat spec (chat: assistant-only loss). With `cda`, each document or
    conversation that has gendered words comes again with them swapped (counterfactual data augmentation)."""
    kind, source = parse_spec(spec)
    if kind == "pairs":
        raise DataError(f"data spec {spec!r} holds preference pairs, which only train.objective=dpo reads")
    if kind == "chat":
        conversations = read_chat(source)
        if cda:
            swapped = ([{**m, "content": counterfactual(m["content"])} for m in c] for c in conversations)
            conversations += [s for s, c in zip(swapped, conversations, strict=True) if s != c]
        return tokenize_conversations(conversations, tokenizer, seq_len)
    documents = read_documents(source)
    if cda:
        documents = (text for doc in documents for text in dict.fromkeys([doc, counterfactual(doc)]))
    return tokenize_documents(documents, tokenizer, seq_len)


def load_sequences(spec: str, tokenizer: Tokenizer, limit: int | None = None) -> list[np.ndarray]:
    """The first `limit` (default all) documents of a documents spec as [bos] + ids + [eos], or conversations
    of a chat spec as [2, n] (tokens, assistant-only loss mask), whole: what `lmjax eval lm` scores."""
    kind, source = parse_spec(spec)
    if kind == "pairs":
        raise DataError(f"data spec {spec!r} holds preference pairs; language-model evaluation reads documents "
                        "or chat:... conversations")
    if kind == "chat":
        return tokenize_conversations(read_chat(source)[:limit], tokenizer, sys.maxsize)
    return tokenize_documents(itertools.islice(read_documents(source), limit), tokenizer, sys.maxsize)


def load_pairs(spec: str) -> list[Pair]:
    """Preference pairs of a `pairs:GLOB` spec."""
    kind, source = parse_spec(spec)
    if kind != "pairs":
        raise DataError(f"train.objective=dpo reads preference pairs: use data.train=pairs:GLOB, got {spec!r}")
    return read_pairs(source)


def texts(spec: str) -> Iterator[str]:
    """The raw texts of a spec, to train a tokenizer on."""
    kind, source = parse_spec(spec)
    if kind == "chat":
        return (m["content"] for c in read_chat(source) for m in c)
    if kind == "pairs":
        return (t for p in read_pairs(source) for t in (*(m["content"] for m in p["prompt"]), p["chosen"],
                                                          p["rejected"]))
    return read_documents(source)


def prepared_tokenizer(spec: str) -> Path | None:
    """The tokenizer directory of a prepared-directory spec, else None."""
    kind, source = parse_spec(spec)
    prepared = parse_prepared(source) if kind == "documents" else None
    return prepared[0] / "tokenizer" if prepared else None
