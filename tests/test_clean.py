"""Tests for lmjax.corpus.clean: normalisation, quality rules and the blocklist."""

import itertools
import unicodedata
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmjax.config import DataError
from lmjax.corpus.clean import clean_config, normalize, quality_issue, quality_rules, top_ngram_frac
from lmjax.corpus.stdlib_docs import stdlib_documents
from lmjax.text.blocklist import Blocklist

GOOD = (
    "The quick brown fox jumps over the lazy dog near the river.\n"
    "Later that afternoon it rested under an old oak tree, watching birds.\n"
    "Nobody in the village had ever seen such a clever animal before."
)


def config(**quality):
    cfg = clean_config()
    cfg.quality.update(quality)
    return cfg


def flags(nfc: bool, strip_control: bool, whitespace: bool):
    cfg = clean_config()
    cfg.normalize.update(nfc=nfc, strip_control=strip_control, whitespace=whitespace)
    return cfg


def is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\n\t"


# normalize


def test_config_has_every_knob():
    cfg = clean_config()
    assert set(cfg.normalize) == {"nfc", "strip_control", "whitespace"}
    assert set(cfg.blocklist) == {"enabled", "path", "words", "patterns"}
    assert {"enabled", "min_words", "max_words", "max_top_ngram_frac", "min_alpha_word_frac"} <= set(cfg.quality)


def test_normalize_nfc():
    assert normalize("Cafe\u0301", clean_config()) == "Caf\u00e9"


def test_normalize_drops_control_characters_but_keeps_tab_and_newline():
    assert normalize("a\x00b\x07c\x1b[0m\td\x7f\x9f\ne\x0cf", clean_config()) == "abc[0m\td\nef"


def test_normalize_line_endings_and_whitespace():
    text = "\n  \n  Title  \r\nline one\t \rline two\u2028\n\n\n\n\n\nend   \n \n"
    assert normalize(text, clean_config()) == "  Title\nline one\nline two\n\n\nend"


def test_normalize_keeps_two_blank_lines():
    assert normalize("a\n\n\nb", clean_config()) == "a\n\n\nb"


def test_normalize_switched_off_is_identity():
    text = "Cafe\u0301 \x00 \r\n\n\n\n\n x  "
    assert normalize(text, flags(False, False, False)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_is_idempotent_nfc_and_control_free(text):
    out = normalize(text, clean_config())
    assert normalize(out, clean_config()) == out
    assert unicodedata.is_normalized("NFC", out)
    assert not any(is_control(ch) for ch in out)
    assert "\r" not in out and not out.startswith("\n") and not out.endswith("\n")


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from("ae\u0301\u0327 \t\n\r\x00\x0c\x85\u2028\u00a0x")))
def test_normalize_is_idempotent_under_every_flag_combination(text):
    for combo in itertools.product([False, True], repeat=3):
        cfg = flags(*combo)
        out = normalize(text, cfg)
        assert normalize(out, cfg) == out, combo


# quality


def test_good_text_passes():
    assert quality_issue(GOOD, clean_config()) is None


@pytest.mark.parametrize(
    "text, rule",
    [
        ("Hello there world.", "too_few_words"),
        ("I a o u e i a o u e a.", "short_words"),
        (
            "Antidisestablishmentarianism supercalifragilistic pneumonoultramicroscopic electroencephalograph"
            " floccinaucinihilipil.",
            "long_words",
        ),
        ("Heading #alpha #beta #gamma #delta and some content here.", "symbol_ratio"),
        ("Totals 12345 67890 13579 24680 11111 22222 33333.", "few_alpha_words"),
        ("home about contact\nproducts services blog\nlogin register help\nterms privacy cookies", "few_punct_lines"),
        ("Buy cheap watches online today.\n" * 3 + "Another line here, quite different.", "repeated_lines"),
        ("The best offer is the best offer and the best offer is here for the best offer today.", "top_2gram"),
    ],
)
def test_rule_fails(text, rule):
    assert quality_issue(text, clean_config()) == rule
    assert rule in quality_rules(clean_config())


def test_too_many_words():
    assert quality_issue(GOOD, config(max_words=10)) == "too_many_words"


def test_longer_ngram_rules():
    text = "We sell red shoes today. Then we sell red shoes again, and we sell red shoes forever."
    assert quality_issue(text, config(max_top_ngram_frac=(1.0, 0.5, 1.0))) == "top_3gram"
    assert quality_issue(text, config(max_top_ngram_frac=(1.0, 1.0, 0.5))) == "top_4gram"
    assert quality_issue(text, config(max_top_ngram_frac=(1.0, 1.0, 1.0))) is None


def test_top_ngram_frac():
    words = ["a", "bb", "a", "bb", "cc"]
    assert top_ngram_frac(words, 2, 8) == pytest.approx(2 * 3 / 8)
    assert top_ngram_frac(words, 3, 8) == 0.0
    assert top_ngram_frac(["one", "two", "three"], 2, 11) == 0.0


def test_quality_disabled():
    assert quality_issue("", config(enabled=False)) is None
    assert quality_issue("", clean_config()) == "too_few_words"


def test_quality_rule_names_follow_ngram_sizes():
    assert quality_rules(config(max_top_ngram_frac=(0.3, 0.3)))[-3:] == ("repeated_lines", "top_2gram", "top_3gram")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_quality_never_raises(text):
    cfg = clean_config()
    assert quality_issue(text, cfg) in (None, *quality_rules(cfg))


def test_stdlib_docstrings_mostly_pass():
    cfg = clean_config()
    docs = [normalize(d, cfg) for d in stdlib_documents()]
    passed = sum(quality_issue(d, cfg) is None for d in docs)
    assert passed / len(docs) > 0.85
    blocklist = Blocklist.default()
    assert not any(blocklist.match(d) for d in docs)


# blocklist


def test_default_blocklist_ships_and_matches():
    assert resources.files("lmjax.text").joinpath("blocklist.txt").is_file()
    blocklist = Blocklist.default()
    assert len(blocklist) > 10
    assert blocklist.match("Tell me HOW TO MAKE A   bomb\nplease") == "how to make a bomb"
    assert blocklist.match("How to assemble a pipe bomb").startswith("re:")
    assert blocklist.match("The bomb squad made the area safe; chemistry is fun.") is None


def test_blocklist_whole_word_case_insensitive():
    blocklist = Blocklist(words=("meth", "Nerve Agent"))
    assert blocklist.match("a method and a methodology") is None
    assert blocklist.match("Cooking METH.") == "meth"
    assert blocklist.match("a nerve\n agent") == "nerve agent"
    assert blocklist.match("nerve agents") is None


def test_blocklist_prefers_longer_entries():
    blocklist = Blocklist(words=("bomb", "how to make a bomb"))
    assert blocklist.match("how to make a bomb") == "how to make a bomb"


def test_blocklist_regex_is_whole_word():
    blocklist = Blocklist(patterns=(r"kill(ing)?\s+\w+",))
    assert blocklist.match("stop killing bees") == r"re:kill(ing)?\s+\w+"
    assert blocklist.match("overkill ") is None


def test_blocklist_patterns_that_cannot_be_combined():
    with pytest.raises(DataError, match="combined"):
        Blocklist(patterns=("(?P<x>a)", "(?P<x>b)"))


def test_empty_blocklist_matches_nothing():
    assert Blocklist().match("anything at all") is None


def test_custom_blocklist_file(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# my list\n\nforbidden phrase\nre:bad\\d+\n", encoding="utf-8")
    blocklist = Blocklist.from_file(path)
    assert blocklist.match("a Forbidden  Phrase here") == "forbidden phrase"
    assert blocklist.match("bad42!") == r"re:bad\d+"
    assert blocklist.match("# my list") is None


def test_custom_blocklist_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt"):
        Blocklist.from_file(missing)
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\n# comment\nre:(unclosed\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.txt:3"):
        Blocklist.from_file(bad)
    bad.write_text("re:x*\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty string"):
        Blocklist.from_file(bad)


def test_blocklist_from_config(tmp_path):
    cfg = clean_config().blocklist
    cfg.words = ("zorblax",)
    cfg.patterns = (r"qu+x",)
    blocklist = Blocklist.from_config(cfg)
    assert blocklist.match("how to make a bomb") == "how to make a bomb"
    assert blocklist.match("ZORBLAX!") == "zorblax"
    assert blocklist.match("quuux") == "re:qu+x"

    path = tmp_path / "custom.txt"
    path.write_text("only this\n", encoding="utf-8")
    cfg.path = str(path)
    blocklist = Blocklist.from_config(cfg)
    assert blocklist.match("how to make a bomb") is None
    assert blocklist.match("only this") == "only this"

    cfg.enabled = False
    assert Blocklist.from_config(cfg).match("only this") is None

    cfg.enabled, cfg.patterns = True, ("[",)
    with pytest.raises(DataError, match=r"blocklist.patterns\[0\]"):
        Blocklist.from_config(cfg)
    cfg.patterns, cfg.path = (), str(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="missing.txt"):
        Blocklist.from_config(cfg)
