"""The package map: each stage imports only the stages below it, with no cycles (docs/architecture.md)."""

import ast
from pathlib import Path

import lmjax

# Bottom to top: a module may import its own package and any package listed before it.
LAYERS = ("config", "parallel", "text", "corpus", "model", "input", "run", "infer", "compress", "eval", "interop",
          "train", "serve", "report", "cli")
NO_JAX = ("text", "corpus")  # pure-Python stages


def _package(path: Path, root: Path) -> str:
    return path.relative_to(root).parts[0].removesuffix(".py")


def _lmjax_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported lmjax package or top-level module, full module name) of every import in `path`,
    including imports inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "lmjax" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lmjax" and len(parts) > 1:
                found.append((node.lineno, parts[1], name))
            elif parts[0] in ("jax", "flax", "optax", "orbax"):
                found.append((node.lineno, "<jax>", name))
    return found


def upward_imports(root: Path) -> list[str]:
    """Every import of a package at the same level or above the importing one (other than itself)."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    problems = []
    for path in sorted(root.rglob("*.py")):
        here = _package(path, root)
        if here == "__init__":
            continue
        assert here in rank, f"{path}: package {here!r} is not in the layer map; add it to LAYERS and the docs"
        for line, there, name in _lmjax_imports(path):
            if there == "<jax>":
                if here in NO_JAX:
                    problems.append(f"{path}:{line} imports {name}, but lmjax.{here} must not use JAX")
            elif there != here and rank.get(there, len(LAYERS)) >= rank[here]:
                problems.append(f"{path}:{line} (lmjax.{here}) imports {name}, which is not below it")
    return problems


def test_every_import_runs_downwards():
    assert upward_imports(Path(lmjax.__file__).parent) == []


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "serve" / "api.py").write_text("from lmjax.train.loop import train\n")
    (tmp_path / "train" / "loop.py").write_text("def f():\n    from lmjax.serve import api\n")
    (tmp_path / "text" / "tok.py").write_text("import jax.numpy as jnp\n")
    problems = upward_imports(tmp_path)
    assert len(problems) == 2  # serve -> train runs downwards; train -> serve closes the cycle
    assert any("(lmjax.train) imports lmjax.serve" in p for p in problems)
    assert any("lmjax.text must not use JAX" in p for p in problems)


# Imported only by modules that need a dev extra: `lmjax.eval.harness` is lmjax as an lm-eval model class.
DEV_ONLY_IMPORTS = {"lm_eval"}


def test_every_third_party_import_is_a_declared_dependency():
    """`make quickstart` installs only the core dependencies: a package lmjax imports that reaches the test
    venv only through the dev extra's dependencies would pass every test and break the quickstart."""
    import importlib.metadata
    import re
    import sys
    import tomllib

    root = Path(lmjax.__file__).parent
    project = tomllib.loads((root.parent / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                if name in sys.stdlib_module_names or name == "lmjax" or name in DEV_ONLY_IMPORTS:
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
                if not dists & declared:
                    missing.append(f"{path.relative_to(root.parent)}: {name} ({', '.join(sorted(dists))})")
    assert not missing, "imported but not in pyproject's dependencies:\n" + "\n".join(sorted(set(missing)))
