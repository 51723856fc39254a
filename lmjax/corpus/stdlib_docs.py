"""The embedded default corpus: docstrings of the running Python's standard library.

Every module, class and function docstring found by parsing the stdlib's .py files
(tests, IDLE, demos and other noise skipped), followed by the `pydoc_data.topics`
help topics. Extraction takes a couple of seconds, so the result is cached as JSON
under `$LMJAX_CACHE_DIR` (default `~/.cache/lmjax`), keyed by Python version.
"""

import ast
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from lmjax.text.io import atomic_write

CORPUS_VERSION = 1  # bump when the extraction rules change, to invalidate caches
MIN_DOC_CHARS = 40
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "encodings",
    "pydoc_data",
    "lib-dynload",
    "__pycache__",
    "__phello__",
}
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def cache_dir() -> Path:
    """Directory for lmjax caches: `$LMJAX_CACHE_DIR`, else `~/.cache/lmjax`."""
    return Path(os.environ.get("LMJAX_CACHE_DIR", Path.home() / ".cache" / "lmjax"))


def stdlib_root() -> Path:
    """Directory holding the running interpreter's pure-Python standard library."""
    return Path(os.__file__).resolve().parent


def stdlib_files(root: Path | None = None) -> list[Path]:
    """All stdlib .py files worth reading, in a deterministic (sorted) order."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        names = sorted(f for f in filenames if f.endswith(".py") and not f.startswith("test_"))
        files += [Path(dirpath, f) for f in names]
    return files


def clean(text: str) -> str:
    """Strip trailing whitespace from each line and blank lines at both ends."""
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and its nested classes/functions, in source order."""
    if isinstance(node, DOC_NODES) and (doc := ast.get_docstring(node, clean=True)):
        yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def file_docstrings(path: Path) -> list[str]:
    """Cleaned docstrings of one Python source file ([] if it does not parse)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    return [clean(d) for d in _docstrings(tree)]


def topic_documents() -> list[str]:
    """The interactive help() topics shipped in `pydoc_data.topics`, sorted by name."""
    from pydoc_data.topics import topics

    return [clean(topics[name]) for name in sorted(topics)]


def extract_documents(files: list[Path] | None = None) -> list[str]:
    """Extract the corpus: docstrings of `files` (default: the stdlib) then the help topics.

    Documents shorter than MIN_DOC_CHARS are dropped and exact duplicates keep only
    their first occurrence.
    """
    files = stdlib_files() if files is None else files
    docs = [d for path in files for d in file_docstrings(path)] + topic_documents()
    return list(dict.fromkeys(d for d in docs if len(d) >= MIN_DOC_CHARS))


def cache_path() -> Path:
    """Cache file for the running Python version."""
    v = sys.version_info
    return cache_dir() / f"stdlib-docs-py{v.major}.{v.minor}.{v.micro}-v{CORPUS_VERSION}.json"


def stdlib_documents() -> list[str]:
    """The default corpus (~2 MB of English), loaded from the cache or extracted and cached."""
    path = cache_path()
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
            return docs
    except (OSError, ValueError):
        pass
    docs = extract_documents()
    try:
        atomic_write(path, json.dumps(docs, ensure_ascii=False))
    except OSError as e:
        warnings.warn(f"could not cache the stdlib corpus at {path}: {e}", stacklevel=2)
    return docs
