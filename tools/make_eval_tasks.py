"""Writes the built-in evaluation tasks (lmjax/eval/tasks/*.jsonl) from the held-out standard library modules.

    .venv/bin/python tools/make_eval_tasks.py

The modules are those of the chat dataset's held-out split (`is_heldout`), so no chat fine-tune has seen
questions about them (their docstrings are in the pretraining corpus, as any library's docs would be). The files
are checked in, so every machine evaluates the same questions whatever its Python version; rerun this only to
change the tasks. Seeded: the same Python gives the same files.
"""

import json
import random
from pathlib import Path

from lmjax.corpus.stdlib_chat import build_chat_dataset, is_heldout
from lmjax.corpus.stdlib_facts import (
    expand_packages,
    first_sentence,
    own_doc,
    public_objects,
    safe_import,
    stdlib_modules,
)
from lmjax.eval.chat_qa import qa_pairs

OUT = Path(__file__).resolve().parents[1] / "lmjax" / "eval" / "tasks"
FEWSHOT, ROWS, CHOICES = 3, 150, 4


def heldout_objects() -> list[tuple[str, str, object]]:
    """(module, qualified name, object) of the documented public objects of the held-out modules."""
    out = []
    for name in expand_packages([m for m in stdlib_modules() if is_heldout(m, 0.1)]):
        module = safe_import(name)
        if module is not None:
            out += [(name, qualified, obj) for qualified, obj in public_objects(module)]
    return out


def module_rows(objects, rng: random.Random) -> list[dict]:
    """"Which module defines `name`?" with three other held-out modules that do not have that attribute."""
    modules = sorted({m for m, _, _ in objects})
    rows = []
    for module, qualified, _ in objects:
        attr = qualified[len(module) + 1:]
        if "." in attr:  # methods: the question is about top-level names
            continue
        others = [m for m in modules if m != module and not hasattr(safe_import(m), attr)]
        if len(others) < CHOICES - 1:
            continue
        choices = [module, *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        rows.append({"context": f"Question: Which module of Python's standard library defines `{attr}`?\nAnswer:",
                     "choices": choices, "answer": choices.index(module)})
    return rows


def docstring_rows(objects, rng: random.Random) -> list[dict]:
    """The first sentence of a docstring cut in half: which second half belongs to it."""
    halves = []
    for _, qualified, obj in objects:
        sentence = first_sentence(own_doc(obj) or "")
        words = (sentence or "").split()
        if len(words) >= 8:
            cut = len(words) // 2
            halves.append((qualified, " ".join(words[:cut]), " ".join(words[cut:])))
    rows = []
    for i, (qualified, head, tail) in enumerate(halves):
        others = list({t for j, (_, _, t) in enumerate(halves) if j != i and t != tail})
        choices = [tail, *rng.sample(sorted(others), CHOICES - 1)]
        rng.shuffle(choices)
        rows.append({"context": f"{qualified}: {head}", "choices": choices, "answer": choices.index(tail)})
    return rows


def chat_rows() -> list[dict]:
    """Single-question conversations of the held-out chat split: the question and the reference reply."""
    pairs = qa_pairs(build_chat_dataset()["heldout"])
    return [{"context": prompt[-1]["content"], "target": reply} for prompt, reply in pairs
            if [m["role"] for m in prompt] in (["user"], ["system", "user"])]


def write(name: str, rows: list[dict], rng: random.Random) -> None:
    rng.shuffle(rows)
    rows = [{**r, "split": "fewshot"} for r in rows[:FEWSHOT]] + rows[FEWSHOT:FEWSHOT + ROWS]
    (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{name}: {len(rows) - FEWSHOT} questions + {FEWSHOT} few-shot examples")


def main() -> None:
    objects = heldout_objects()
    write("stdlib_module_mc", module_rows(objects, random.Random(0)), random.Random(1))
    write("stdlib_docstring_mc", docstring_rows(objects, random.Random(2)), random.Random(3))
    write("stdlib_chat_qa", chat_rows(), random.Random(4))


if __name__ == "__main__":
    main()
