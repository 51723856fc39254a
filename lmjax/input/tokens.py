"""Token shards: the tokenized, chunked corpus in ArrayRecord files that training reads record by record.

    DIR/manifest.json                    format, tokenizer fingerprint, seq_len, kind, dtype, per split: shards,
                                         records, tokens and the unigram counts of the prediction targets
    DIR/tokenizer/                       a copy of the tokenizer that made them
    DIR/SPLIT/SPLIT-00000.arrayrecord    one chunk per record: the chunk's tokens as `dtype` bytes; chat chunks
                                         hold the tokens then the loss mask ([2, n] row-major), preference
                                         pairs both sequences then their flags (`lmjax/input/pairs.py`)

A record is what `lmjax/input/chunks.py` makes ([bos] + ids + [eos] cut into chunks of <= seq_len + 1 tokens,
overlap 1; a conversation as a (tokens, loss mask) chunk) or a preference pair's `pair_chunk`, in source
order, so reading the shards by index gives the same chunks, in the same order, as tokenizing the source in
memory. Writing streams: documents go in batches to tokenizing processes and their chunks straight to the
current shard, so memory does not grow with the corpus (preference pairs, small, are read whole first).
A directory is written under a temporary name and renamed when complete.

Raw data specs (`stdlib`, `text:...`, `chat:...`, `pairs:...`) are tokenized once into `$LMJAX_CACHE_DIR/tokens/KEY`,
KEY a hash of (spec, the files it names with their sizes and times, tokenizer, seq_len), then read the same way.
"""

import collections
import fcntl
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lmjax.config import DataError
from lmjax.corpus import stdlib_chat, stdlib_docs
from lmjax.corpus.stdlib_docs import cache_dir
from lmjax.input.chunks import tokenize_conversations, tokenize_documents
from lmjax.input.pairs import LOSS, pair_chunks
from lmjax.text.tokenizer import Tokenizer

FORMAT = 1
MANIFEST = "manifest.json"
KINDS = ("documents", "chat", "pairs")
BATCH_ITEMS = {"documents": 256, "chat": 64, "pairs": 64}  # documents, conversations or pairs per tokenizing task
SHARD_TOKENS = 64 * 2**20  # start a new shard after this many tokens
CHUNKING = "[bos] + ids + [eos] in chunks of <= seq_len + 1 tokens overlapping by 1; chat: longest prefix that fits"
WRITER_OPTIONS = "group_size:1,uncompressed"  # every record readable on its own

_worker: dict = {}


def _init_worker(tokenizer: Any, kind: str, seq_len: int) -> None:
    _worker.update(tokenizer=tokenizer, kind=kind, seq_len=seq_len)


def _encode(items: list) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, int]:
    """(every chunk's values concatenated, chunk lengths, prediction targets, unigram counts of the targets the
    loss counts, items dropped) of a batch of documents, conversations or preference pairs; a chat or pair
    chunk's values are its tokens then its mask row."""
    tokenizer, seq_len, kind = _worker["tokenizer"], _worker["seq_len"], _worker["kind"]
    if kind == "documents":
        chunks, dropped = tokenize_documents(items, tokenizer, seq_len), 0
    elif kind == "chat":
        chunks = tokenize_conversations(items, tokenizer, seq_len)
        dropped = len(items) - len(chunks)
    else:
        chunks, dropped = pair_chunks(items, tokenizer, seq_len)
    targets = [c[1:] if c.ndim == 1 else c[0, 1:][(c[1, 1:] & LOSS) > 0] for c in chunks]
    counted = np.concatenate(targets) if targets else np.zeros(0, np.int32)
    unigram = np.bincount(counted, minlength=tokenizer.vocab_size)
    values = np.concatenate([c.reshape(-1) for c in chunks]) if chunks else np.zeros(0, np.int32)
    sequences = 2 if kind == "pairs" else 1  # a pair chunk holds two sequences, each with one non-target token
    targets_total = sum(c.shape[-1] - sequences for c in chunks)
    return values, np.array([c.size for c in chunks], np.int64), targets_total, unigram, dropped


def _batches(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _encoded(items: Iterable, tokenizer: Any, kind: str, seq_len: int, workers: int) -> Iterator[tuple]:
    """`_encode` of each batch of `items`, in order, by `workers` processes (1: this one) with at most two
    batches per worker in flight."""
    batches = _batches(items, BATCH_ITEMS[kind])
    if workers <= 1 or not isinstance(tokenizer, Tokenizer):  # a Hugging Face tokenizer encodes on its own threads
        _init_worker(tokenizer, kind, seq_len)
        yield from map(_encode, batches)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _init_worker, (tokenizer, kind, seq_len)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitWriter:
    """Writes one split's records into numbered shards; keeps its counts for the manifest."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, vocab_size: int):
        self.root, self.split, self.dtype = root, split, dtype
        (root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.unigram = np.zeros(vocab_size, np.int64)
        self.dropped = 0
        self.writer: ArrayRecordWriter | None = None

    def _open(self) -> None:
        name = f"{self.split}/{self.split}-{len(self.shards):05d}.arrayrecord"
        self.writer = ArrayRecordWriter(str(self.root / name), WRITER_OPTIONS)
        self.shards.append({"file": name, "records": 0, "tokens": 0})

    def add(self, values: np.ndarray, sizes: np.ndarray, targets: int, unigram: np.ndarray, dropped: int) -> None:
        self.dropped += dropped
        if not len(sizes):
            return
        if self.writer is None or self.shards[-1]["tokens"] >= SHARD_TOKENS:
            self.close()
            self._open()
        data = values.astype(self.dtype).tobytes()
        width = self.dtype.itemsize
        offsets = np.concatenate([[0], np.cumsum(sizes)]) * width
        for start, end in zip(offsets[:-1], offsets[1:], strict=True):
            self.writer.write(data[start:end])
        self.shards[-1]["records"] += len(sizes)
        self.shards[-1]["tokens"] += targets
        self.unigram[: len(unigram)] += unigram

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def summary(self) -> dict:
        return {"shards": self.shards, "records": sum(s["records"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards), "dropped": self.dropped,
                "unigram": self.unigram.tolist()}


def write_tokens(out: str | Path, splits: dict[str, Callable[[], Iterable]], tokenizer: Any, seq_len: int,
                 kind: str = "documents", source: str = "", workers: int = 2, log: Callable = print) -> dict:
    """Tokenizes each split (`splits[name]()` yields documents, conversations for kind "chat", or preference
    pairs for kind "pairs") into token shards in `out` (replaced if it exists); returns the manifest."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)
    start = time.time()
    try:
        summaries = {}
        for split, items in splits.items():
            writer = _SplitWriter(tmp, split, dtype, tokenizer.vocab_size)
            try:
                for encoded in _encoded(items(), tokenizer, kind, seq_len, workers):
                    writer.add(*encoded)
            finally:
                writer.close()
            summaries[split] = writer.summary()
        manifest = {"format": FORMAT, "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                    "seq_len": seq_len, "chunking": CHUNKING, "kind": kind, "dtype": dtype.name, "source": source,
                    "seconds": round(time.time() - start, 2), "splits": summaries}
        tokenizer.save(tmp / "tokenizer")
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = sum(s["tokens"] for s in summaries.values())
    log(f"tokenized {source or out} into {out}: {tokens:,} tokens in {manifest['seconds']:.1f}s "
        f"({tokens / max(manifest['seconds'], 1e-9):,.0f} tokens/s)")
    return manifest


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a token-shard directory, or None if `directory` is not one."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


class TokenChunks:
    """One split of a token-shard directory as a random-access sequence of chunks (int32 [n], or [2, n] for
    chat and preference pairs), read from the shards on demand: what grain's `MapDataset.source` takes."""

    def __init__(self, directory: str | Path, split: str, manifest: dict):
        import grain

        self.directory, self.split = Path(directory), split
        info = manifest["splits"][split]
        self.records, self.tokens = info["records"], info["tokens"]
        self.unigram = np.asarray(info["unigram"], np.int64)
        self.dropped = info.get("dropped", 0)  # conversations or pairs too long for seq_len
        self.seq_len, self.masked = manifest["seq_len"], manifest["kind"] != "documents"
        self.dtype = np.dtype(manifest["dtype"])
        paths = [str(self.directory / s["file"]) for s in info["shards"]]
        self.source = grain.sources.ArrayRecordDataSource(paths) if paths else []

    def __len__(self) -> int:
        return self.records

    def _decode(self, record: bytes) -> np.ndarray:
        chunk = np.frombuffer(record, self.dtype).astype(np.int32)
        return chunk.reshape(2, -1) if self.masked else chunk

    def __getitem__(self, index: int) -> np.ndarray:
        return self._decode(self.source[index])

    def __getitems__(self, indices: list[int]) -> list[np.ndarray]:
        return [self._decode(r) for r in self.source.__getitems__(indices)]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"TokenChunks({str(self.directory)!r}, {self.split!r})"


def open_tokens(directory: str | Path, split: str, tokenizer: Any, seq_len: int,
                kinds: tuple[str, ...] = ("documents", "chat")) -> TokenChunks:
    """Split `split` of the token shards in `directory`; `DataError` if they were made with another tokenizer
    or chunking, hold another kind of data than `kinds`, or lack the split."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory} holds no token shards ({MANIFEST} is missing)")
    if manifest.get("kind") not in kinds:
        use = "train.objective=dpo" if manifest.get("kind") == "pairs" else "an lm or chat objective"
        raise DataError(f"the token shards in {directory} hold {manifest.get('kind')}, not {' or '.join(kinds)}: "
                        f"train on them with {use}")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{directory}: token-shard format {manifest.get('format')}, this lmjax reads {FORMAT}; "
                        f"re-tokenize with `lmjax data tokenize`")
    remedy = (f"re-tokenize with `lmjax data tokenize ... --seq-len {seq_len}` and this run's tokenizer, "
              f"or train with the settings they were made for")
    if manifest["tokenizer"] != tokenizer.fingerprint:
        raise DataError(f"the token shards in {directory} were made with another tokenizer (fingerprint "
                        f"{manifest['tokenizer']}, this run's is {tokenizer.fingerprint}): {remedy}")
    if manifest["seq_len"] != seq_len or manifest.get("chunking") != CHUNKING:
        raise DataError(f"the token shards in {directory} are chunked for seq_len {manifest['seq_len']}, this run "
                        f"has model.seq_len {seq_len}: {remedy}")
    if split not in manifest["splits"]:
        raise DataError(f"the token shards in {directory} have no split {split!r} (they have "
                        f"{', '.join(manifest['splits'])})")
    return TokenChunks(directory, split, manifest)


def _source_signature(spec: str) -> list:
    """(path, size, mtime) of the files a spec's parts name, so a cache entry goes stale when they change."""
    files: set[str] = set()
    for part in re.split(r"[|@,]|:(?!//)", spec):
        if part and ("/" in part or "*" in part or os.path.exists(part)):
            for path in glob.glob(part, recursive=True):
                files |= {str(p) for p in Path(path).rglob("*") if p.is_file()} if os.path.isdir(path) else {path}
    return [(p, (s := os.stat(p)).st_size, s.st_mtime_ns) for p in sorted(files)]


def cache_key(spec: str, tokenizer: Any, seq_len: int, variant: str = "") -> str:
    """The cache entry name of a raw spec tokenized with `tokenizer` for `seq_len`; `variant` names a
    transformation of the spec's items ("cda"; "train" or "heldout" for the two sides of a pair split). The
    embedded datasets' versions and the Python they are built from are part of it, so `stdlib` and
    `chat:stdlib` entries go stale when lmjax changes how it builds them."""
    embedded = [stdlib_docs.CORPUS_VERSION, stdlib_chat.CHAT_CORPUS_VERSION, sys.version]
    key = {"format": FORMAT, "spec": spec, "variant": variant, "tokenizer": tokenizer.fingerprint, "seq_len": seq_len,
           "chunking": CHUNKING, "files": _source_signature(spec), "embedded": embedded}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cached_tokens(spec: str, items: Callable[[], Iterable], tokenizer: Any, seq_len: int, kind: str,
                  variant: str = "", workers: int = 2, log: Callable = print) -> TokenChunks:
    """The token chunks of raw spec `spec` (its documents, conversations or pairs from `items()`, `variant`
    as in `cache_key`), tokenized into the cache the first time (under a lock: concurrent processes tokenize
    it once)."""
    root = cache_dir() / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    directory = root / cache_key(spec, tokenizer, seq_len, variant)
    if read_manifest(directory) is None:
        with open(root / f"{directory.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if read_manifest(directory) is None:
                write_tokens(directory, {"data": items}, tokenizer, seq_len, kind, spec, workers, log)
    return open_tokens(directory, "data", tokenizer, seq_len, (kind,))
