"""The embedded chat dataset: valid, short, varied, deterministic, and split by module."""

import random
import re
import sys
import textwrap
from collections import Counter

import pytest

from lmjax.corpus.renaming import made_up_word, renamed
from lmjax.corpus.safety_phrasings import CATEGORIES
from lmjax.corpus.stdlib_chat import (
    MAX_CONVERSATION_CHARS,
    build_chat_dataset,
    identity_conversations,
    is_heldout,
    keyword_conversations,
    module_conversations,
    safety_conversations,
    write_chat_dataset,
)
from lmjax.corpus.stdlib_facts import first_sentence, signature_text
from lmjax.eval.chat_qa import qa_pairs
from lmjax.text.chat_template import check_conversation, read_conversations

MODULES = ["json", "textwrap", "fractions", "heapq", "bisect"]


@pytest.fixture(scope="module")
def small():
    return build_chat_dataset(MODULES, heldout_fraction=0.3, seed=0)


def _text(conversation) -> str:
    return " ".join(m["content"] for m in conversation if m["role"] != "system")


def test_conversations_are_valid_and_short(small):
    assert small["train"] and small["heldout"]
    for conversation in small["train"] + small["heldout"]:
        check_conversation(conversation)
        assert conversation[-1]["role"] == "assistant"
        assert sum(len(m["content"]) for m in conversation) <= MAX_CONVERSATION_CHARS
        assert all(len(m["content"]) <= 320 for m in conversation if m["role"] == "assistant")


def test_heldout_modules_never_appear_in_train(small):
    heldout = [m for m in ["json", "json.decoder", "json.encoder", "json.scanner", "json.tool", *MODULES[1:]]
               if is_heldout(m, 0.3)]
    assert heldout and len(heldout) < 9
    train_text = " ".join(_text(c) for c in small["train"])
    heldout_text = " ".join(_text(c) for c in small["heldout"])
    for module in heldout:
        assert f"`{module}." in heldout_text or f"`{module}`" in heldout_text
        qualified = {w.strip("`.:") for w in heldout_text.split() if w.strip("`").startswith(module + ".")}
        assert not any(q in train_text for q in qualified if q.count(".") > module.count("."))
        assert f"the `{module}` module" not in train_text


def test_renamed_copies_make_up_the_names_consistently():
    rng = random.Random(0)
    assert [made_up_word(w, random.Random(1)) for w in ("get_count", "TaskGroup", "HTTP_OK")] != [
        "get_count", "TaskGroup", "HTTP_OK"]
    for word in ("get_count", "TaskGroup", "HTTP_OK", "dumps", "x2"):
        made_up = made_up_word(word, rng)
        assert made_up.isidentifier() and made_up != word and made_up.count("_") == word.count("_")
        assert made_up[0].isupper() == word[0].isupper() and abs(len(made_up) - len(word)) <= 1

    def pair(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    conversation = pair("How do I call json.dumps?", "`json.dumps(obj, *, skipkeys=False)`") + pair(
        "Where can I import dumps from?", "`dumps` is in the `json` module: `from json import dumps`.") + pair(
        "What is the json module for?", "The `json` module: JSON (JavaScript Object Notation) for json data.")
    out = renamed(conversation, "json", random.Random(0))
    module, name = out[0]["content"][len("How do I call "):-1].split(".")
    assert {module, name}.isdisjoint({"json", "dumps"}) and module != name
    assert out[1]["content"] == f"`{module}.{name}(obj, *, skipkeys=False)`"
    assert out[2]["content"] == f"Where can I import {name} from?"
    assert out[3]["content"] == f"`{name}` is in the `{module}` module: `from {module} import {name}`."
    assert out[4]["content"] == f"What is the {module} module for?"  # bare names in the user's turns too
    assert out[5]["content"] == f"The `{module}` module: JSON (JavaScript Object Notation) for json data."
    assert renamed(conversation, "json", random.Random(0)) == out
    assert renamed(pair("What is a list?", "A sequence."), "json", rng) == pair("What is a list?", "A sequence.")
    assert renamed(pair("What is os.path?", "`os.path`: Path operations."), "os.path", rng)[1]["content"].endswith(
        ": Path operations.")


def test_training_module_conversations_come_again_renamed(small):
    def about(conversation):  # the module an object conversation's first answer names (`mod.obj...`)
        found = re.match(r"`([A-Za-z_]\w*)\.\w", conversation[-1]["content"] if len(conversation) < 4 else "")
        return found and found.group(1)

    def skeleton(conversation):  # the conversation with its names and the user's words left out
        return tuple(re.sub(r"`[^`]*`", "``", m["content"]) for m in conversation if m["role"] == "assistant")

    real = [c for c in small["train"] if about(c) in MODULES]
    made_up = [c for c in small["train"] if about(c) and about(c) not in sys.stdlib_module_names]
    assert len(real) > 20 and Counter(map(skeleton, made_up)) == Counter(map(skeleton, real))
    for conversation in made_up:
        asked = conversation[-1]["content"].split("`")[1].split("(")[0]
        assert asked in conversation[-2]["content"] or asked.rsplit(".", 1)[-1] in conversation[-2]["content"]


def test_deterministic_with_seed():
    a = build_chat_dataset(["textwrap", "bisect"], seed=3)
    assert a == build_chat_dataset(["textwrap", "bisect"], seed=3)
    assert a != build_chat_dataset(["textwrap", "bisect"], seed=4)
    assert module_conversations("heapq", random.Random(1)) == module_conversations("heapq", random.Random(1))


def test_phrasing_variety():
    questions = set()
    for seed in range(8):
        for conversation in module_conversations("textwrap", random.Random(seed)):
            user = conversation[-2]["content"]
            if conversation[-1]["content"].startswith("`textwrap.dedent`:") and len(conversation) <= 3:
                questions.add(user)
    assert len(questions) >= 5, questions


def test_module_conversation_types():
    conversations = module_conversations("textwrap", random.Random(0))
    texts = [_text(c) for c in conversations]
    assert any("`textwrap.TextWrapper`: " in t for t in texts)
    assert any("`textwrap.dedent(text)`" in t for t in texts)
    assert any("is in the `textwrap` module: `from textwrap import " in t for t in texts)
    assert any("The `textwrap` module: " in t for t in texts)
    assert any(len(c) >= 4 for c in conversations)


def test_skipped_and_broken_modules():
    assert module_conversations("this", random.Random(0)) == []
    assert module_conversations("antigravity", random.Random(0)) == []
    assert module_conversations("no_such_module_xyz", random.Random(0)) == []


def test_first_sentence_cleans_markup():
    doc = "Return the :func:`len` of ``x`` (see :ref:`foo`).\n\nMore text here."
    assert first_sentence(doc) == "Return the `len` of `x`."
    assert first_sentence("f(a, b) -> int\n\nCompute things, e.g. sums. Then more.") == "Compute things, e.g. sums."
    assert first_sentence("x" * 400 + ".") is None


def test_keywords_identity_and_safety():
    rng = random.Random(0)
    keywords = keyword_conversations(rng)
    assert any("`with` statement" in c[-1]["content"] for c in keywords)
    identity = identity_conversations(rng)
    assert len({c[-2]["content"] for c in identity}) >= 20
    assert all("lmjax" in c[-1]["content"] or "Python" in c[-1]["content"] for c in identity)
    safety = safety_conversations(rng)
    refusals = {r for table in CATEGORIES.values() for r in table["refusals"]}
    answers = {a for table in CATEGORIES.values() for a in table["benign"].values()}
    for split in ("train", "heldout"):
        replies = [c[-1]["content"] for c in safety[split]]
        assert all(r in refusals or r in answers for r in replies)
        assert sum(r in refusals for r in replies) > len(replies) / 3 and sum(r in answers for r in replies) > 8
    assert len({c[-2]["content"] for c in safety["train"]}) >= 500


def test_qa_pairs(small):
    pairs = qa_pairs(small["heldout"])
    assert len(pairs) == len(small["heldout"])
    for prompt, answer in pairs:
        assert prompt[-1]["role"] == "user" and answer


def test_user_package(tmp_path, monkeypatch):
    package = tmp_path / "mytoypkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('"""A toy package for tests."""\n\n'
                                         'def greet(name: str) -> str:\n    """Return a friendly greeting."""\n')
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "maths.py").write_text(textwrap.dedent('''
        """Small maths helpers."""

        class Adder:
            """Add numbers to a running total."""

            def add(self, x: int) -> int:
                """Add x and return the new total."""

        def double(x: int) -> int:
            """Return twice x."""
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        split = build_chat_dataset(["mytoypkg"], heldout_fraction=0.0)
        text = " ".join(_text(c) for c in split["train"])
        assert "`mytoypkg.greet`: Return a friendly greeting." in text
        assert "`mytoypkg.greet(name: str) -> str`" in text
        assert "`mytoypkg.sub.maths.Adder.add`: Add x and return the new total." in text
        counts = write_chat_dataset(str(tmp_path / "out"), ["mytoypkg"], log=lambda _: None)
        assert counts["train"] == len(list(read_conversations(tmp_path / "out" / "train.jsonl")))
        assert counts["heldout"] == len(list(read_conversations(tmp_path / "out" / "heldout.jsonl")))
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "mytoypkg"]:
            del sys.modules[name]


def test_stdlib_default_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path))
    split = build_chat_dataset()
    assert len(split["train"]) > 3000 and len(split["heldout"]) > 100
    assert list(tmp_path.glob("stdlib-chat-*.jsonl"))
    assert build_chat_dataset() == split


def test_signatures_do_not_depend_on_where_python_is_installed():
    """`platform.architecture`'s default is this interpreter's path: the chat data says `sys.executable` instead,
    so two checkouts (two venvs) build the same dataset."""
    import platform
    import sys

    text = signature_text(platform.architecture)
    assert "executable=sys.executable" in text and sys.executable not in text
