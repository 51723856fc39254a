"""Reading documents out of text, JSONL, Parquet and TFDS inputs, with bad-input accounting.

Each reader streams `Document`s and reports every bad input to a `BadInput` callback under one
reason of `SKIP_REASONS` instead of stopping. Files are sniffed for binary content, decoded as UTF-8
with bad bytes replaced, and read line by line (JSONL, and text files over MAX_DOC_BYTES) or by
batches (Parquet, TFDS), so memory stays bounded whatever the input size.
"""

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lmjax.config import DataError

MAX_LINE_CHARS = 1_000_000  # longer lines (JSONL, or text files split into parts) are "line_too_long"
MAX_DOC_BYTES = 4 << 20  # text files above this are split into documents of about this size
SNIFF_BYTES = 8192  # how much of a file decides whether it is binary
BINARY_SHARE = 0.05  # a NUL byte, or more than this share of control bytes, means binary

SKIP_REASONS = (
    "invalid_utf8",  # kept, with bad bytes replaced: the only reason that does not skip
    "binary",  # a binary file (or, in JSONL, a line of binary junk)
    "empty",  # an empty or whitespace-only file, record or field
    "broken_json",  # a JSONL line that does not parse
    "missing_field",  # a record without the field (or null, or not a JSON object)
    "non_string_field",  # the field holds a number, list, object or bool
    "line_too_long",  # a line over MAX_LINE_CHARS
    "unreadable_file",  # the file cannot be opened or read (I/O error, broken link, corrupt Parquet)
)
_TEXT_BYTES = bytes(sorted({7, 8, 9, 10, 11, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F}))

BadInput = Callable[[str, str], None]  # (reason, ident)


@dataclass(frozen=True, slots=True)
class Document:
    """One document: its text, the spec of the source it came from, and a stable identifier."""

    text: str
    source: str
    ident: str


def _control_share(block: bytes) -> float:
    return len(block.translate(None, _TEXT_BYTES)) / max(len(block), 1)


def _looks_binary(block: bytes) -> bool:
    """A NUL byte, or too many control bytes: the usual "is this text?" test (git, file(1))."""
    return b"\0" in block or _control_share(block) > BINARY_SHARE


def _decode(raw: bytes, ident: str, bad: BadInput) -> str:
    """UTF-8 text of `raw`; bad bytes become U+FFFD and are reported as invalid_utf8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        bad("invalid_utf8", ident)
        return raw.decode("utf-8", errors="replace")


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for each line of `f`, with None for lines over MAX_LINE_CHARS.

    Reads at most 4 * MAX_LINE_CHARS bytes (the UTF-8 size of MAX_LINE_CHARS characters) at a time,
    so a gigantic line is consumed in pieces and never held whole.
    """
    limit = 4 * MAX_LINE_CHARS
    for lineno in itertools.count(1):
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield lineno, None
        elif len(line) > MAX_LINE_CHARS + 2 and len(line.decode("utf-8", "replace").rstrip("\r\n")) > MAX_LINE_CHARS:
            yield lineno, None
        else:
            yield lineno, line


def _text_parts(f: BinaryIO, ident: str, bad: BadInput) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) of consecutive runs of whole lines of about MAX_DOC_BYTES."""
    part: list[bytes] = []
    size = start = 0
    for lineno, line in _lines(f):
        if line is None:
            bad("line_too_long", f"{ident}:{lineno}")
            continue
        if part and size + len(line) > MAX_DOC_BYTES:
            yield start, b"".join(part)
            part, size = [], 0
        if not part:
            start = lineno
        part.append(line)
        size += len(line)
    if part:
        yield start, b"".join(part)


def text_records(files: list[Path], source: str, bad: BadInput) -> Iterator[Document]:
    """Each file as one document, or as several of about MAX_DOC_BYTES split at line ends."""
    for path in files:
        try:
            with open(path, "rb") as f:
                head = f.read(MAX_DOC_BYTES + 1)
                if _looks_binary(head[:SNIFF_BYTES]):
                    bad("binary", str(path))
                    continue
                if len(head) <= MAX_DOC_BYTES:
                    parts: Iterator[tuple[int, bytes]] = iter([(0, head)])
                else:
                    del head
                    f.seek(0)
                    parts = _text_parts(f, str(path), bad)
                for start, raw in parts:
                    ident = f"{path}:{start}" if start else str(path)
                    if not raw.strip():
                        bad("empty", ident)
                        continue
                    yield Document(_decode(raw, ident, bad), source, ident)
        except OSError:
            bad("unreadable_file", str(path))


def jsonl_records(files: list[Path], field: str, source: str, bad: BadInput) -> Iterator[Document]:
    """One document per JSON line, from its `field`."""
    for path in files:
        objects = with_field = lines = 0
        try:
            with open(path, "rb") as f:
                if _control_share(f.read(SNIFF_BYTES)) > BINARY_SHARE:  # a stray NUL is left to the line checks
                    bad("binary", str(path))
                    continue
                f.seek(0)
                for lineno, raw in _lines(f):
                    ident = f"{path}:{lineno}"
                    if raw is None:
                        bad("line_too_long", ident)
                        continue
                    if not raw.strip():
                        continue
                    lines += 1
                    try:
                        line, repaired = raw.decode("utf-8"), False
                    except UnicodeDecodeError:
                        line, repaired = raw.decode("utf-8", errors="replace"), True
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError):
                        bad("binary" if _looks_binary(raw) else "broken_json", ident)
                        continue
                    objects += isinstance(record, dict)
                    text = record.get(field) if isinstance(record, dict) else None
                    with_field += isinstance(record, dict) and field in record
                    if text is None:
                        bad("missing_field", ident)
                    elif not isinstance(text, str):
                        bad("non_string_field", ident)
                    elif not text.strip():
                        bad("empty", ident)
                    else:
                        if b"\\u" in raw:  # JSON escapes can encode lone surrogates, which are not UTF-8
                            try:
                                text.encode()
                            except UnicodeEncodeError:
                                text, repaired = text.encode(errors="replace").decode(), True
                        if repaired:
                            bad("invalid_utf8", ident)
                        yield Document(text, source, ident)
        except OSError:
            bad("unreadable_file", str(path))
            continue
        if lines == 0:
            bad("empty", str(path))
        elif objects and not with_field:
            raise DataError(f"{path}: none of its JSON objects has a field {field!r}")


def parquet_records(files: list[Path], column: str, source: str, bad: BadInput) -> Iterator[Document]:
    """One document per row, from its text `column`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)  # read pages, not whole row groups
        except (OSError, pa.ArrowException):
            bad("unreadable_file", str(path))
            continue
        with pf:
            schema = pf.schema_arrow
            if column not in schema.names:
                raise DataError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
            kind = schema.field(column).type
            kind = kind.value_type if pa.types.is_dictionary(kind) else kind
            if kind not in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
                raise DataError(f"{path}: column {column!r} holds {kind}, not text")
            if pf.metadata.num_rows == 0:
                bad("empty", str(path))
                continue
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=1024, columns=[column], use_threads=False):
                    for value in batch.column(0).to_pylist():
                        ident = f"{path}:{row}"
                        row += 1
                        if value is None:
                            bad("missing_field", ident)
                        elif not value.strip():
                            bad("empty", ident)
                        else:
                            text = _decode(value, ident, bad) if isinstance(value, bytes) else value
                            yield Document(text, source, ident)
            except (OSError, pa.ArrowException):
                bad("unreadable_file", str(path))


def is_text_feature(feature: Any) -> bool:
    """Whether a TFDS feature holds one string per example."""
    import numpy as np
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.Text):
        return True
    return (
        isinstance(feature, tfds.features.Tensor) and feature.shape == () and np.dtype(feature.np_dtype).kind in "OSU"
    )


def _tfds_examples(ds: Any, batch_size: int = 256) -> Iterator[dict]:
    """The examples of a TFDS data source in order, read a batch at a time."""
    for start in range(0, len(ds), batch_size):
        keys = list(range(start, min(start + batch_size, len(ds))))
        try:
            batch = ds.__getitems__(keys)
        except TypeError:  # the sources of tfds.testing.mock_data have no working batched reads
            batch = [ds[i] for i in keys]
        yield from batch


def tfds_records(ds: Any, field: str, prefix: str, source: str, bad: BadInput) -> Iterator[Document]:
    """One document per example of the TFDS data source `ds`, from its text `field`."""
    for i, example in enumerate(_tfds_examples(ds)):
        ident = f"{prefix}:{i}"
        value = example[field]
        text = _decode(value, ident, bad) if isinstance(value, bytes) else value
        if not text.strip():
            bad("empty", ident)
            continue
        yield Document(text, source, ident)
