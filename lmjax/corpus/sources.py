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
The per-format readers and these limits live in `lmjax.corpus.readers`.

Bad input never stops iteration. Each skipped input is counted under one reason of `SKIP_REASONS`;
`invalid_utf8` counts documents that were kept with the bad bytes replaced by U+FFFD. Configuration
mistakes still raise `DataError` (a ValueError): a malformed spec, a glob matching nothing, a Parquet
column that is missing or not text, a JSONL file whose JSON objects never hold FIELD.
"""

import glob
import math
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmjax.config import DataError
from lmjax.corpus.readers import (
    BadInput,
    Document,
    is_text_feature,
    jsonl_records,
    parquet_records,
    text_records,
    tfds_records,
)
from lmjax.corpus.shards import iter_split, parse_prepared
from lmjax.corpus.stdlib_docs import stdlib_documents
from lmjax.text.io import hash_unit

VALID_SPECS = (
    "stdlib, stdlib:val, stdlib:all, DIR[:val] (prepared), "
    "text:GLOB, jsonl:GLOB[:FIELD], parquet:GLOB[:COLUMN], tfds:NAME[/CONFIG][:SPLIT[:FIELD]], "
    "mix[/cycle][/seed=N]:SPEC[@W]|SPEC[@W]|..."
)
VAL_FRACTION = 0.02
VAL_MIN_CHARS = 160_000  # ~40k tokens at ~4 chars/token
MAX_WARNINGS = 20  # read_documents warns about this many bad inputs, then sums up the rest


# The embedded corpus is this Python's own docstrings and pydoc topics, under the Python Software Foundation License.
EMBEDDED_LICENSE = "PSF-2.0 (Python standard library docstrings and pydoc topics)"


def source_license(spec: str, declared: str = "") -> str:
    """What a card says of a source's license: the `declared` one, else the embedded corpus's for stdlib
    sources, else that none was declared."""
    if declared:
        return declared
    if spec.startswith(("stdlib", "chat:stdlib")):
        return EMBEDDED_LICENSE
    return "not declared (set the data config's `license`)"


def split_train_val(
    docs: list[str], fraction: float = VAL_FRACTION, min_chars: int = VAL_MIN_CHARS
) -> tuple[list[str], list[str]]:
    """Split `docs` deterministically by text hash into (train, val), both in corpus order.

    Documents with the smallest hashes go to val until it holds at least `fraction`
    of the documents and at least `min_chars` characters (or half the corpus).
    Identical texts always land on the same side.
    """
    by_hash = sorted(range(len(docs)), key=lambda i: (hash_unit(docs[i]), i))
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


def _bad_spec(spec: str, why: str) -> DataError:
    return DataError(f"bad data source {spec!r}: {why}; valid forms are: {VALID_SPECS}")


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
    text_fields = [k for k, f in features.items() if is_text_feature(f)]
    field = m["field"] or ("text" if "text" in text_fields else next(iter(text_fields), None))
    if field is None:
        raise _bad_spec(spec, f"no text feature among {sorted(features)}")
    if field not in text_fields:
        raise _bad_spec(spec, f"{field!r} is not a text feature; text features: {text_fields}")
    return ds, field, f"tfds:{name}/{split}"


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
    `DataError` right away.
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
        return text_records(_glob(spec, rest), spec, bad)
    if kind in ("jsonl", "parquet") and rest:
        pattern, field = _split_field(rest)
        reader = jsonl_records if kind == "jsonl" else parquet_records
        return reader(_glob(spec, pattern), field or "text", spec, bad)
    if kind == "tfds" and rest:
        return tfds_records(*_open_tfds(spec, rest), spec, bad)
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

    A malformed spec or a glob that matches no file raises `DataError` right away.
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
