"""Init container of the lmjax StatefulSet: mirrors the shared trained run into this replica's run directory.

    python3 sync_run.py SOURCE RUN_DIR

Copies what `lmjax serve` reads (config.json, tokenizer/, checkpoints/) from SOURCE (the read-only model volume)
into RUN_DIR (the replica's own volume), skipping files whose size and modification time already match, and
removes checkpoint steps and tokenizer files that SOURCE no longer has, so a model rolled back in SOURCE is
rolled back here too (the server loads the newest step it finds). Anything else in RUN_DIR is left alone:
feedback.sqlite (this replica's feedback) and xla-cache/ (its compiled programs) survive every restart.
Files are copied to a temporary name and renamed, so an interrupted copy is redone at the next start.
Standard library only: it runs with the image's python3 before the server starts.
"""

import os
import shutil
import sys
from pathlib import Path

SERVED = ("config.json", "tokenizer", "checkpoints")


def _same(src: Path, dst: Path) -> bool:
    """Whether `dst` is already a copy of `src` (same size and modification time, as copy2 leaves it)."""
    if not dst.is_file():
        return False
    a, b = src.stat(), dst.stat()
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def _copy(src: Path, dst: Path) -> int:
    """Copies one file unless already there; returns the bytes copied."""
    if _same(src, dst):
        return 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    shutil.copy2(src, part)
    os.replace(part, dst)
    return src.stat().st_size


def _mirror(src: Path, dst: Path) -> int:
    """Makes directory `dst` hold exactly the files of `src`; returns the bytes copied."""
    copied = 0
    wanted = set()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        wanted.add(rel)
        if path.is_file():
            copied += _copy(path, dst / rel)
        elif path.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
    # Deepest first, so a directory is empty by the time it is checked.
    for path in sorted(dst.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.relative_to(dst) not in wanted:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return copied


def sync(source: Path, run_dir: Path) -> int:
    """Mirrors `SERVED` from `source` into `run_dir`; returns the bytes copied. Exits if `source` is no run."""
    missing = [name for name in SERVED if not (source / name).exists()]
    if missing:
        sys.exit(f"sync_run: {source} lacks {', '.join(missing)}: load a trained run (config.json, tokenizer/, "
                 "checkpoints/) into the lmjax-model volume, see deploy/k8s/README.md")
    run_dir.mkdir(parents=True, exist_ok=True)
    copied = _copy(source / "config.json", run_dir / "config.json")
    for name in SERVED[1:]:
        copied += _mirror(source / name, run_dir / name)
    return copied


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    total = sync(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"sync_run: {sys.argv[2]} up to date with {sys.argv[1]} ({total / 1e6:.1f} MB copied)", flush=True)
