"""Document sources, named by a short spec string.

stdlib                               the embedded stdlib corpus, training part
stdlib:val                           its held-out part (a deterministic split by text hash)
stdlib:all                           all of it (for `lmjax data prepare`, which splits by itself)
DIR[:train|:val]                     a directory written by `lmjax data prepare` (default split: train)
text:GLOB                            every matching file is one document (UTF-8; files over
                                     MAX_DOC_BYTES become several documents, split at line ends)
jsonl:GLOB[:FIELD]                   one document per JSON line, from FIELD (default "text")
parquet:GLOB[:COLUMN]                one document per row, from COLUMN (default "text")
tfds:NAME[/CONFIG][:SPLIT[:FIELD]]   a TFDS dataset through `tfds.data_source` (no TensorFlow needed;
                                     prepared as array_record under $TFDS_DATA_DIR or the TFDS default);
                                     SPLIT defaults to "train" and may be sliced ("train[:10%]"); FIELD
                                     defaults to "text" if that is a string feature, else the first one
mix[/cycle][/seed=N]:SPEC[@W]|SPEC[@W]|...
                                     a weighted mixture: each document comes from a component drawn with
                                     probability proportional to its weight W (default 1), seeded
                                     (default seed 0). It ends when a drawn component runs out; with
                                     /cycle, exhausted components restart until every one has run out
                                     once. Components are split on "|"; a trailing "@W" is a weight only
                                     if W is a number. Mixtures do not nest.

`iter_records(spec)` streams `Document`s with a stable `ident` ("path", "path:LINE", "path:ROW",
"tfds:NAME/SPLIT:INDEX", "stdlib:SPLIT:INDEX"). Memory stays bounded whatever the corpus size (only
the list of matching file names grows with it): JSONL files and text files over MAX_DOC_BYTES are read
line by line, skipping lines over MAX_LINE_CHARS without holding them; Parquet is read by batches.

Bad input never stops iteration. Each skipped input is counted under one reason of `SKIP_REASONS`;
`invalid_utf8` counts documents that were kept with the bad bytes replaced by U+FFFD. Configuration
mistakes still raise ValueError: a malformed spec, a glob matching nothing, a Parquet column that is
missing or not text, a JSONL file whose JSON objects never hold FIELD.
"""

import glob
import hashlib
import itertools
import json
import math
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lmjax.data.shards import iter_split, parse_prepared
from lmjax.data.stdlib_corpus import stdlib_documents

VALID_SPECS = (
    "stdlib, stdlib:val, stdlib:all, DIR[:val] (prepared), "
    "text:GLOB, jsonl:GLOB[:FIELD], parquet:GLOB[:COLUMN], tfds:NAME[/CONFIG][:SPLIT[:FIELD]], "
    "mix[/cycle][/seed=N]:SPEC[@W]|SPEC[@W]|..."
)
VAL_FRACTION = 0.02
VAL_MIN_CHARS = 160_000  # ~40k tokens at ~4 chars/token

MAX_LINE_CHARS = 1_000_000  # longer lines (JSONL, or text files split into parts) are "line_too_long"
MAX_DOC_BYTES = 4 << 20  # text files above this are split into documents of about this size
SNIFF_BYTES = 8192  # how much of a file decides whether it is binary
BINARY_SHARE = 0.05  # a NUL byte, or more than this share of control bytes, means binary
MAX_WARNINGS = 20  # read_documents warns about this many bad inputs, then sums up the rest

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
    """Matching files in sorted order; broken links are kept (to be counted as unreadable)."""
    paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    files = [p for p in paths if p.is_file() or (p.is_symlink() and not p.exists())]
    if not files:
        raise _bad_spec(spec, f"no files match {pattern!r}")
    return files


def _split_field(rest: str) -> tuple[str, str | None]:
    """'PATTERN:FIELD' -> (PATTERN, FIELD); a PATTERN alone -> (PATTERN, None)."""
    head, _, tail = rest.rpartition(":")
    if head and re.fullmatch(r"\w+", tail):
        return head, tail
    return rest, None


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


def _text_records(files: list[Path], source: str, bad: BadInput) -> Iterator[Document]:
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


def _jsonl_records(files: list[Path], field: str, source: str, bad: BadInput) -> Iterator[Document]:
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
            raise ValueError(f"{path}: none of its JSON objects has a field {field!r}")


def _parquet_records(files: list[Path], column: str, source: str, bad: BadInput) -> Iterator[Document]:
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
                raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
            kind = schema.field(column).type
            kind = kind.value_type if pa.types.is_dictionary(kind) else kind
            if kind not in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
                raise ValueError(f"{path}: column {column!r} holds {kind}, not text")
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


def _is_text_feature(feature: Any) -> bool:
    import numpy as np
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.Text):
        return True
    return (
        isinstance(feature, tfds.features.Tensor) and feature.shape == () and np.dtype(feature.np_dtype).kind in "OSU"
    )


def _open_tfds(spec: str, rest: str) -> tuple[Any, str, str]:
    """(data source, text field, ident prefix) for the rest of a tfds: spec."""
    split_re = r"(?:[^:\[\]]|\[[^\]]*\])+"  # "train", "train[:10%]", "train+test[5:]"
    m = re.fullmatch(rf"(?P<name>\w+(?:/[\w.-]+)?)(?::(?P<split>{split_re})(?::(?P<field>\w+))?)?", rest)
    if not m:
        raise _bad_spec(spec, "expected tfds:NAME[/CONFIG][:SPLIT[:FIELD]]")
    import tensorflow_datasets as tfds

    name, split = m["name"], m["split"] or "train"
    try:
        ds = tfds.data_source(name, split=split, data_dir=os.environ.get("TFDS_DATA_DIR"), download=False)
    except Exception as e:  # tfds raises many kinds of errors for datasets it cannot open
        raise _bad_spec(spec, f"TFDS cannot open it ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    features = ds.dataset_info.features
    text_fields = [k for k, f in features.items() if _is_text_feature(f)]
    field = m["field"] or ("text" if "text" in text_fields else next(iter(text_fields), None))
    if field is None:
        raise _bad_spec(spec, f"no text feature among {sorted(features)}")
    if field not in text_fields:
        raise _bad_spec(spec, f"{field!r} is not a text feature; text features: {text_fields}")
    return ds, field, f"tfds:{name}/{split}"


def _tfds_examples(ds: Any, batch_size: int = 256) -> Iterator[dict]:
    """The examples of a TFDS data source in order, read a batch at a time."""
    for start in range(0, len(ds), batch_size):
        keys = list(range(start, min(start + batch_size, len(ds))))
        try:
            batch = ds.__getitems__(keys)
        except TypeError:  # the sources of tfds.testing.mock_data have no working batched reads
            batch = [ds[i] for i in keys]
        yield from batch


def _tfds_records(ds: Any, field: str, prefix: str, source: str, bad: BadInput) -> Iterator[Document]:
    for i, example in enumerate(_tfds_examples(ds)):
        ident = f"{prefix}:{i}"
        value = example[field]
        text = _decode(value, ident, bad) if isinstance(value, bytes) else value
        if not text.strip():
            bad("empty", ident)
            continue
        yield Document(text, source, ident)


def _stdlib_records(split: str) -> Iterator[Document]:
    train, val = split_train_val(stdlib_documents())
    docs = val if split == "val" else train
    source = "stdlib:val" if split == "val" else "stdlib"
    for i, text in enumerate(docs):
        yield Document(text, source, f"stdlib:{split}:{i}")


def _weighted(part: str) -> tuple[str, float]:
    """'SPEC@W' -> (SPEC, W); a SPEC without a numeric "@W" at its end -> (SPEC, 1.0)."""
    head, _, tail = part.rpartition("@")
    try:
        return (head, float(tail)) if head else (part, 1.0)
    except ValueError:
        return part, 1.0


def _parse_mixture(spec: str, kind: str, rest: str) -> tuple[list[tuple[str, float]], bool, int]:
    """(components with weights, cycle?, seed) of a mix spec."""
    cycle, seed = False, 0
    for option in kind.split("/")[1:]:
        if option == "cycle":
            cycle = True
        elif re.fullmatch(r"seed=\d+", option):
            seed = int(option[5:])
        else:
            raise _bad_spec(spec, f"unknown mixture option {option!r}")
    components = []
    for part, weight in map(_weighted, rest.split("|")):
        if not part:
            raise _bad_spec(spec, "empty mixture component")
        if part.split(":")[0].split("/")[0] == "mix":
            raise _bad_spec(spec, "mixtures do not nest")
        if not (weight > 0 and math.isfinite(weight)):
            raise _bad_spec(spec, f"weight of {part!r} must be a positive number")
        components.append((part, weight))
    return components, cycle, seed


def _mix_records(
    components: list[tuple[str, float]],
    cycle: bool,
    seed: int,
    streams: list[Iterator[Document]],
    open_: Callable[[str], Iterator[Document]],
) -> Iterator[Document]:
    """Documents of `streams` (opened from `components`; `open_` reopens one) drawn by weight."""
    rng = random.Random(seed)
    weights = [w for _, w in components]
    exhausted = [False] * len(components)
    while True:
        i = rng.choices(range(len(weights)), weights=weights)[0]
        doc = next(streams[i], None)
        if doc is None:
            exhausted[i] = True
            if not cycle or all(exhausted):
                return
            streams[i] = open_(components[i][0])
            doc = next(streams[i], None)
            if doc is None:  # nothing even after a restart: drop the component
                weights[i] = 0.0
                if not any(weights):
                    return
                continue
        yield doc


def iter_records(
    spec: str, stats: Counter | None = None, *, on_bad_input: BadInput | None = None
) -> Iterator[Document]:
    """Stream the `Document`s of the source `spec` (see the module docstring).

    Every bad input adds one to `stats[reason]` (reasons: SKIP_REASONS) and is passed to
    `on_bad_input(reason, ident)`. A malformed spec or a glob that matches no file raises
    ValueError right away.
    """

    def bad(reason: str, ident: str) -> None:
        if stats is not None:
            stats[reason] += 1
        if on_bad_input is not None:
            on_bad_input(reason, ident)

    prepared = parse_prepared(spec)
    if prepared is not None:
        directory, split = prepared
        return (Document(text, spec, f"{directory}:{split}:{i}") for i, text in enumerate(iter_split(*prepared)))
    kind, _, rest = spec.partition(":")
    if kind == "stdlib" and rest == "all":
        return (Document(text, spec, f"stdlib:all:{i}") for i, text in enumerate(stdlib_documents()))
    if kind == "stdlib" and rest in ("", "train", "val"):
        return _stdlib_records(rest or "train")
    if kind == "text" and rest:
        return _text_records(_glob(spec, rest), spec, bad)
    if kind in ("jsonl", "parquet") and rest:
        pattern, field = _split_field(rest)
        reader = _jsonl_records if kind == "jsonl" else _parquet_records
        return reader(_glob(spec, pattern), field or "text", spec, bad)
    if kind == "tfds" and rest:
        return _tfds_records(*_open_tfds(spec, rest), spec, bad)
    if kind.split("/")[0] == "mix" and rest:
        components, cycle, seed = _parse_mixture(spec, kind, rest)
        open_ = lambda s: iter_records(s, stats, on_bad_input=on_bad_input)
        return _mix_records(components, cycle, seed, [open_(s) for s, _ in components], open_)
    raise _bad_spec(spec, "unknown source")


def _texts(records: Iterator[Document], skipped: Counter) -> Iterator[str]:
    for doc in records:
        yield doc.text
    unshown = skipped.total() - MAX_WARNINGS
    if unshown > 0:
        summary = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items()))
        warnings.warn(f"{unshown} more bad inputs skipped without a warning (all skips: {summary})", stacklevel=2)


def read_documents(spec: str) -> Iterator[str]:
    """Iterate over the texts of the source `spec` (see the module docstring).

    A malformed spec or a glob that matches no file raises ValueError right away.
    Skipped inputs other than empty ones are reported as warnings (the first MAX_WARNINGS
    one by one, the rest summed up at the end); use `iter_records` to count them instead.
    """
    skipped: Counter = Counter()

    def warn(reason: str, ident: str) -> None:
        if reason in ("empty", "invalid_utf8"):
            return
        skipped[reason] += 1
        if skipped.total() <= MAX_WARNINGS:
            warnings.warn(f"{ident}: skipping bad input ({reason})", stacklevel=2)

    return _texts(iter_records(spec, on_bad_input=warn), skipped)
