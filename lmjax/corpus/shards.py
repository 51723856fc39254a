"""The on-disk format of prepared data: ArrayRecord shards of UTF-8 documents per split.

    DIR/train/train-00000.arrayrecord, DIR/val/val-00000.arrayrecord, ..., DIR/tokenizer/, DIR/card.json

A shard is written under a temporary name and renamed when complete, so readers never see a partial one.
"""

from collections.abc import Iterator
from pathlib import Path

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from lmjax.text.io import atomic_output

SPLITS = ("train", "val")


def shard_paths(out: str | Path, split: str) -> list[Path]:
    """Finished shards of a split, in order."""
    return sorted((Path(out) / split).glob(f"{split}-*.arrayrecord"))


def write_shard(path: Path, texts: list[str]) -> None:
    """Writes one shard atomically (temporary file, then rename)."""
    with atomic_output(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        try:
            for text in texts:
                writer.write(text.encode("utf-8"))
        finally:
            writer.close()


def iter_split(out: str | Path, split: str) -> Iterator[str]:
    """Documents of one split of a prepared directory, shard by shard."""
    for path in shard_paths(out, split):
        reader = ArrayRecordReader(str(path))
        try:
            yield from (record.decode("utf-8") for record in reader.read_all())
        finally:
            reader.close()


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a finished `lmjax data prepare` output directory."""
    return (Path(path) / "card.json").is_file()


def parse_prepared(spec: str) -> tuple[Path, str] | None:
    """(directory, split) if `spec` names a prepared directory (`DIR`, `DIR:train` or `DIR:val`), else None."""
    base, _, split = spec.rpartition(":")
    if split in SPLITS and base and is_prepared(base):
        return Path(base), split
    return (Path(spec), "train") if is_prepared(spec) else None
