"""Document sources, named by a short spec string.

stdlib               the embedded stdlib corpus, training part
stdlib:val           its held-out part (a deterministic split by text hash)
text:GLOB            every matching file is one document (UTF-8, bad bytes replaced)
jsonl:GLOB[:FIELD]   one document per JSON line, from FIELD (default "text")
"""

import glob
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from lmjax.data.stdlib_corpus import stdlib_documents

VALID_SPECS = "stdlib, stdlib:val, text:GLOB, jsonl:GLOB[:FIELD]"
VAL_FRACTION = 0.02
VAL_MIN_CHARS = 160_000  # ~40k tokens at ~4 chars/token


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def split_train_val(
    docs: list[str], fraction: float = VAL_FRACTION, min_chars: int = VAL_MIN_CHARS
) -> tuple[list[str], list[str]]:
    """Split `docs` deterministically by text hash into (train, val), both in corpus order.

    Documents with the smallest hashes go to val until it holds at least `fraction`
    of the documents and at least `min_chars` characters (or half the corpus).
    Identical texts always land on the same side.
    """
    by_hash = sorted(range(len(docs)), key=lambda i: (_text_hash(docs[i]), i))
    val_ids, chars = set(), 0
    for i in by_hash:
        enough = len(val_ids) >= fraction * len(docs) and chars >= min_chars
        if enough or len(val_ids) >= len(docs) // 2:
            break
        val_ids.add(i)
        chars += len(docs[i])
    val_texts = {docs[i] for i in val_ids}
    train = [d for d in docs if d not in val_texts]
    val = [d for d in docs if d in val_texts]
    return train, val


def _bad_spec(spec: str, why: str) -> ValueError:
    return ValueError(f"bad data source {spec!r}: {why}; valid forms are: {VALID_SPECS}")


def _glob(spec: str, pattern: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
    if not files:
        raise _bad_spec(spec, f"no files match {pattern!r}")
    return files


def _text_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text:
            yield text


def _jsonl_documents(files: list[Path], field: str) -> Iterator[str]:
    for path in files:
        usable = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    warnings.warn(f"{path}:{lineno}: skipping broken JSON line ({e})", stacklevel=2)
                    continue
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    warnings.warn(f"{path}:{lineno}: skipping record without string {field!r}", stacklevel=2)
                    continue
                usable += 1
                if text:
                    yield text
        if usable == 0:
            raise ValueError(f"{path}: no usable JSON lines with a string field {field!r}")


def read_documents(spec: str) -> Iterator[str]:
    """Iterate over the documents of the source `spec` (see the module docstring).

    A malformed spec or a glob that matches no file raises ValueError right away;
    empty documents are skipped.
    """
    kind, _, rest = spec.partition(":")
    if kind == "stdlib" and rest in ("", "train", "val"):
        train, val = split_train_val(stdlib_documents())
        return iter(val if rest == "val" else train)
    if kind == "text" and rest:
        return _text_documents(_glob(spec, rest))
    if kind == "jsonl" and rest:
        pattern, field = rest, "text"
        head, _, tail = rest.rpartition(":")
        if head and re.fullmatch(r"\w+", tail):
            pattern, field = head, tail
        return _jsonl_documents(_glob(spec, pattern), field)
    raise _bad_spec(spec, "unknown source")
