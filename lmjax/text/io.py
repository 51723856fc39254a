"""File chores shared by every stage: atomic writes (of files and of new directories), JSONL lines, and
hashing a text into a split."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmjax.config import ConfigError, DataError


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; renames it onto `path` only if the block succeeds,
    so readers see the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def new_directory(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside `path` to fill; renames it to `path` only if the block succeeds
    (removes it otherwise), so `path` is absent or complete. ConfigError, before anything is written, if
    `path` exists and is not empty: nothing already there is overwritten."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{path} already exists and is not empty; choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield staging
        if path.exists():
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `path` atomically."""
    with atomic_output(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def hash_unit(text: str) -> float:
    """A stable number in [0, 1) from `text` (blake2b; unlike `hash`, the same in every process and run).
    Every train/held-out split in lmjax compares it with the held-out fraction."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "big") / 2**64


def read_jsonl(path: str | Path, skip_invalid: bool = False) -> Iterator[tuple[str, object]]:
    """("file:line", parsed record) per non-blank line; a line that is not JSON raises `DataError` naming it, or
    with `skip_invalid` is skipped (a log a killed process was appending to: its torn line)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_invalid:
                    continue
                raise DataError(f"{where}: not valid JSON ({e})") from None
            yield where, record


def write_jsonl(records, path: str | Path) -> None:
    """Writes one JSON object per line, atomically."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
