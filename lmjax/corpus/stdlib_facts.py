"""What the running interpreter says about its modules: which to import (safely), their public classes and
functions, and each one's first docstring sentence and signature, cleaned of reST markup, memory addresses and
install paths. The chat dataset (`lmjax.corpus.stdlib_chat`) and the evaluation tasks are built from these."""

import contextlib
import importlib
import inspect
import io
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator, Sequence

MAX_ANSWER_CHARS = 220

# Modules that print, open windows or browsers, need a GUI, are tests, or were removed from newer Pythons.
SKIP_MODULES = {
    "this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "idle_test",
    "lib2to3", "distutils", "encodings", "pydoc_data", "ensurepip", "sre_compile", "sre_constants",
    "sre_parse", "asynchat", "asyncore", "imp", "smtpd", "aifc", "audioop", "cgi", "cgitb", "chunk",
    "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd",
    "sunau", "telnetlib", "uu", "xdrlib", "xxlimited", "xxlimited_35", "xxsubtype", "site", "sitecustomize",
    "usercustomize", "setup", "conftest",
}

GENERIC_DOCS = {"An enumeration.", "Create and return a new object.  See help(type) for accurate signature."}


def _skipped(name: str) -> bool:
    """Private, test, GUI and side-effect modules (any dotted part) are never imported."""
    return any(p.startswith("_") or p.startswith("test_") or p in SKIP_MODULES for p in name.split("."))


def safe_import(name: str):
    """The module `name`, or None when skipped or importing fails; output and warnings are swallowed."""
    if _skipped(name):
        return None
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):
            return None


def expand_packages(names: Sequence[str]) -> list[str]:
    """`names` plus the public submodules of those that are packages, recursively, in sorted order."""
    out: list[str] = []
    for name in names:
        module = safe_import(name)
        if module is None:
            continue
        out.append(name)
        if hasattr(module, "__path__"):
            subs = sorted(info.name for info in pkgutil.iter_modules(module.__path__, prefix=name + "."))
            out += expand_packages([s for s in subs if not _skipped(s)])
    return out


def stdlib_modules() -> list[str]:
    """The running Python's top-level public standard library modules, sorted."""
    return sorted(n for n in sys.stdlib_module_names if not _skipped(n))


_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s+[A-Z(`\"']|$)")
NOT_PROSE = re.compile(r"^(New in version|Changed in version|Deprecated|XXX|TODO)|::=")


def clean_markup(text: str) -> str:
    """Plain text from reST: roles and ``literals`` become `code`, links and extra spaces go."""
    text = _ROLE.sub(r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"`([^`]+) <[^>]+>`_+", r"\1", text)
    text = re.sub(r"\s*<https?://[^>]+>", "", text)
    text = re.sub(r"\s*\(see [^)]*\)", "", text)
    return " ".join(text.replace("\u2026", "...").split())


def first_sentence(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The first sentence of the first prose paragraph of a docstring, cleaned; None if none or too long."""
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(text).strip()):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        if not lines or all(_SIGNATURE_LINE.match(line) for line in lines) or NOT_PROSE.search(paragraph):
            continue
        prose = clean_markup(" ".join(lines))
        match = _SENTENCE.match(prose)
        sentence = match.group(1) if match else prose.rstrip(":;,") + "."
        if sentence[-2:] == ":." or not 12 <= len(sentence) <= max_chars:
            return None
        return sentence[0].upper() + sentence[1:]
    return None


def signature_text(obj: object) -> str | None:
    """`str(inspect.signature(obj))` when available, short and free of memory addresses. A default holding this
    interpreter's paths (`platform.architecture(executable=sys.executable)`) reads as the expression the
    documentation shows, so the text does not depend on where Python or the venv is installed."""
    try:
        sig = str(inspect.signature(obj))
    except Exception:  # builtins can fail in many ways (bad text signatures, missing symbols)
        return None
    for name in ("executable", "prefix", "exec_prefix", "base_prefix", "base_exec_prefix"):
        sig = sig.replace(repr(getattr(sys, name)), f"sys.{name}")
    return None if " at 0x" in sig or len(sig) > 110 else sig


def _defined_in(obj: object, module_name: str) -> bool:
    """Whether `obj` belongs to `module_name` (or to its C accelerator `_name`, as heapq/_heapq)."""
    owner = getattr(obj, "__module__", None)
    return owner in (module_name, "_" + module_name.rsplit(".", 1)[-1])


def own_doc(obj: object) -> str:
    """`obj`'s own docstring: "" when it only repeats a base class's (as undocumented exceptions do)."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or doc in GENERIC_DOCS:
        return ""
    if inspect.isclass(obj) and any(doc == getattr(base, "__doc__", None) for base in obj.__mro__[1:]):
        return ""
    return doc


def public_objects(module) -> Iterator[tuple[str, object]]:
    """(qualified name, object) for the module's documented public classes, functions and their methods."""
    name = module.__name__
    exported = getattr(module, "__all__", None)
    for attr in sorted(vars(module)):
        if attr.startswith("_") or (exported is not None and attr not in exported):
            continue
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _defined_in(obj, name):
            continue
        yield f"{name}.{attr}", obj
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                value = vars(obj)[meth]
                if not meth.startswith("_") and inspect.isroutine(value) and value.__doc__:
                    yield f"{name}.{attr}.{meth}", value
