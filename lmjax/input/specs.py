"""The grammar of `data.train` and `data.val`, parsed in this one place.

    SOURCE                     documents: stdlib, stdlib:val, text:GLOB, jsonl:GLOB[:FIELD], parquet:..., tfds:...,
                               mix:..., or a `lmjax data prepare` directory DIR[:train|:val]
                               (lmjax/corpus/sources.py has the document grammar)
    chat:stdlib[:heldout]      the embedded chat dataset (conversations, loss on the assistant's replies)
    chat:GLOB                  conversations from JSONL files ({"messages": [{"role", "content"}, ...]})
    pairs:GLOB                 preference pairs from JSONL ({"prompt", "chosen", "rejected"}), for DPO
    DIR[:SPLIT]                token shards (`lmjax data tokenize`, lmjax/input/tokens.py): documents, chat
                               or preference pairs
"""

import functools
import glob
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmjax.config import DataError
from lmjax.corpus.cda import counterfactual
from lmjax.corpus.shards import SPLITS, iter_split, parse_prepared
from lmjax.corpus.sources import read_documents
from lmjax.input.chunks import tokenize_conversations, tokenize_documents
from lmjax.input.pairs import read_pairs, split_heldout
from lmjax.input.tokens import TokenChunks, cached_tokens, open_tokens, read_manifest, write_tokens
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


def _items(kind: str, source: str, cda: bool) -> Iterable:
    """The documents or conversations of a raw spec. With `cda`, each document or conversation that has
    gendered words comes again with them swapped (counterfactual data augmentation)."""
    if kind == "chat":
        conversations = read_chat(source)
        if cda:
            swapped = ([{**m, "content": counterfactual(m["content"])} for m in c] for c in conversations)
            conversations += [s for s, c in zip(swapped, conversations, strict=True) if s != c]
        return conversations
    documents = read_documents(source)
    if cda:
        documents = (text for doc in documents for text in dict.fromkeys([doc, counterfactual(doc)]))
    return documents


def token_shards(spec: str) -> tuple[Path, str] | None:
    """(directory, split) of the token shards a spec names: a token-shard directory `DIR[:SPLIT]` (default
    split: train, or its only one), or a prepared directory `DIR[:train|:val]` that has them in DIR/tokens."""
    base, _, split = spec.rpartition(":")
    for directory, name in ((base, split), (spec, "")) if base else ((spec, ""),):
        manifest = read_manifest(directory) if directory else None
        if manifest is not None:
            names = list(manifest["splits"])
            return Path(directory), name or ("train" if "train" in names or len(names) != 1 else names[0])
    prepared = parse_prepared(spec)
    if prepared and read_manifest(prepared[0] / "tokens") is not None:
        return prepared[0] / "tokens", prepared[1]
    return None


def open_chunks(spec: str, tokenizer: Tokenizer, seq_len: int, cda: bool = False, workers: int = 1,
                log: Callable = print) -> TokenChunks:
    """Training chunks of a documents or chat spec (chat: assistant-only loss), read lazily from token shards:
    those the spec names, or, for a raw spec (or `cda`), those it is tokenized into in the cache the first
    time (lmjax/input/tokens.py)."""
    kind, source = parse_spec(spec)
    if kind == "pairs":
        raise DataError(f"data spec {spec!r} holds preference pairs, which only train.objective=dpo reads")
    shards = token_shards(spec) if kind == "documents" else None
    if shards and not cda:
        return open_tokens(*shards, tokenizer, seq_len)
    if shards:
        raise DataError(f"data.cda augments raw text, but {spec} holds token shards; use the prepared directory "
                        "or the raw source they were made from")
    return cached_tokens(spec, lambda: _items(kind, source, cda), tokenizer, seq_len, kind, "cda" if cda else "",
                         workers, log)


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


def open_pairs(spec: str, tokenizer: Tokenizer, seq_len: int, part: str = "all", workers: int = 1,
               log: Callable = print) -> TokenChunks:
    """The preference pairs of `spec` as pair chunks (lmjax/input/pairs.py) read lazily from token shards: those
    the spec names, or, for `pairs:GLOB`, those its pairs are tokenized into in the cache the first time.
    `part`: "all" the pairs (of the named split), or one side of the held-out split by prompt: "train" or
    "heldout" (`split_heldout` for `pairs:GLOB`; splits train and val of a token-shard directory)."""
    if part not in ("all", "train", "heldout"):
        raise ValueError(f"part must be all, train or heldout, got {part!r}")
    kind, source = parse_spec(spec)
    shards = token_shards(spec) if kind == "documents" else None
    if shards:
        directory, split = shards
        split = {"all": split, "train": "train", "heldout": "val"}[part]
        return open_tokens(directory, split, tokenizer, seq_len, ("pairs",))
    if kind != "pairs":
        raise DataError(f"train.objective=dpo reads preference pairs: use data.train=pairs:GLOB or a token-shard "
                        f"directory of pairs, got {spec!r}")
    side = {"all": None, "train": 0, "heldout": 1}[part]
    items = (lambda: read_pairs(source)) if side is None else (lambda: split_heldout(read_pairs(source))[side])
    return cached_tokens(spec, items, tokenizer, seq_len, "pairs", "" if side is None else part, workers, log)


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
    """The tokenizer directory of a token-shard or prepared-directory spec, else None."""
    kind, source = parse_spec(spec)
    shards = token_shards(source) if kind == "documents" else None
    if shards:
        return shards[0] / "tokenizer"
    prepared = parse_prepared(source) if kind == "documents" else None
    return prepared[0] / "tokenizer" if prepared else None


def tokenize_prepared(directory: str | Path, seq_len: int, workers: int = 2, log: Callable = print) -> dict:
    """Writes the token shards of a `lmjax data prepare` directory (both splits, its own tokenizer) into
    DIR/tokens, unless they are there already for this tokenizer and seq_len; returns their manifest."""
    directory = Path(directory)
    if parse_prepared(str(directory)) is None:
        raise DataError(f"{directory} is not a `lmjax data prepare` directory (no card.json)")
    tokenizer = Tokenizer.load(directory / "tokenizer")
    existing = read_manifest(directory / "tokens")
    if existing and (existing["tokenizer"], existing["seq_len"]) == (tokenizer.fingerprint, seq_len):
        log(f"{directory / 'tokens'} already holds token shards for seq_len {seq_len}")
        return existing
    splits = {split: functools.partial(iter_split, directory, split) for split in SPLITS}
    return write_tokens(directory / "tokens", splits, tokenizer, seq_len, "documents", str(directory), workers, log)


def tokenize_sources(train: str, val: str, tokenizer: Tokenizer, seq_len: int, out: str | Path,
                     workers: int = 2, log: Callable = print) -> dict:
    """Writes the token shards of raw specs `train` (and `val`, if given) as splits train and val of `out`;
    both documents, both chat, or both preference pairs (without `val`, the pairs of 10% of the prompts are
    held out as split val, `split_heldout`)."""
    specs = {"train": parse_spec(train), **({"val": parse_spec(val)} if val else {})}
    kinds = {kind for kind, _ in specs.values()}
    if len(kinds) > 1:
        raise DataError(f"token shards hold one kind of data per directory: got {', '.join(sorted(kinds))}")
    kind = kinds.pop()
    if kind == "pairs":
        if val:
            splits = {split: functools.partial(read_pairs, source) for split, (_, source) in specs.items()}
        else:
            splits = {split: (lambda side=side: split_heldout(read_pairs(specs["train"].source))[side])
                      for side, split in enumerate(("train", "val"))}
    else:
        splits = {split: functools.partial(_items, kind, source, False) for split, (_, source) in specs.items()}
    return write_tokens(out, splits, tokenizer, seq_len, kind, train, workers, log)
