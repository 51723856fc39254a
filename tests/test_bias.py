"""Bias probes and counterfactual augmentation: a planted occupation-pronoun bias is detected (p < 0.01) and
training on the same text with data.cda=true removes it; the probe sets, CDA's swaps and the CLI."""

import json
import random

import pytest
from conftest import tiny_config

from lmjax.cli import main
from lmjax.corpus.cda import counterfactual
from lmjax.eval.bias import OCCUPATIONS, PRONOUNS, ambiguous_pairs, evaluate_bias, stereotype_pairs
from lmjax.train.loop import train

# Other wording than the probe's contexts: what is planted is the occupation-pronoun link, not the sentences.
PLANTED = ["Yesterday the {o} said {s} was tired after work.", "The {o} came in early because {s} had a lot to do.",
           "When the {o} left, {s} locked the door.", "The {o} smiled and {s} waved at us.",
           "Our {o} says {s} loves the job."]


@pytest.fixture(scope="module")
def planted(trained_run, tmp_path_factory):
    """Bias reports of the pretrained run fine-tuned on stereotyped sentences, without and with CDA."""
    root = tmp_path_factory.mktemp("bias")
    rng = random.Random(0)
    docs = []
    for _ in range(400):
        occupation, gender = rng.choice(OCCUPATIONS)
        docs.append(" ".join(t.format(o=occupation, s=PRONOUNS[gender]) for t in rng.sample(PLANTED, 3)))
    (root / "biased.txt").write_text("\n\n".join(docs))
    reports = {}
    for name, cda in (("biased", "false"), ("cda", "true")):
        train(tiny_config(f"init_from={trained_run[0]}", f"data.train=text:{root / 'biased.txt'}", f"data.cda={cda}",
                          "train.steps=120", "train.warmup_steps=2", "train.eval_every=0", "train.ckpt_every=120",
                          "train.samples="), root / name)
        reports[name] = evaluate_bias(str(root / name))
    reports["base"] = evaluate_bias(str(trained_run[0]))
    return reports


def test_planted_bias_is_detected_and_cda_removes_it(planted):
    biased, cda, base = (planted[k]["occupations"] for k in ("biased", "cda", "base"))
    assert biased["p_value"] < 0.01 and biased["low"] > 0.5, biased
    assert abs(cda["stereotype_share"] - 0.5) < 0.05 and cda["p_value"] > 0.01, cda
    assert abs(cda["stereotype_share"] - 0.5) < abs(biased["stereotype_share"] - 0.5)
    assert abs(base["stereotype_share"] - 0.5) < 0.05
    for report in planted.values():
        assert {"occupations", "ambiguous_questions", "stereotypes/gender", "stereotypes/disability"} <= set(report)
        assert all(0 <= r["low"] <= r["stereotype_share"] <= r["high"] <= 1 for r in report.values())


def test_probe_sets_are_minimal_pairs():
    for pairs in [*stereotype_pairs().values(), ambiguous_pairs()]:
        for a, b in pairs:
            assert a != b and len(set(a.split()) ^ set(b.split())) <= 4  # one group word (maybe two tokens)
    assert len(ambiguous_pairs()) == 2 * 4  # each question with both orders of mention


def test_counterfactual_swaps_gendered_words():
    assert counterfactual("He said that she would give her book to him.") == \
        "She said that he would give his book to her."
    assert counterfactual("The King and his sons; MEN and Women.") == "The Queen and her daughters; WOMEN and Men."
    assert counterfactual("Her car, not hers.") == "His car, not his."
    assert counterfactual("The theme of the show.") == "The theme of the show."  # inside words: untouched


def test_cli_prints_and_writes_the_report(trained_run, tmp_path, capsys):
    out = tmp_path / "bias.json"
    assert main(["eval", "bias", "--workdir", str(trained_run[0]), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "occupations" in printed and "0.5 = no preference" in printed
    assert json.loads(out.read_text())["occupations"]["pairs"] == len(OCCUPATIONS)


def test_cooccurrence_counts_gendered_sentences():
    from lmjax.corpus.demographics import cooccurrence, render_cooccurrence

    summary = cooccurrence(["The nurse said she was tired. The nurse and her son left!\nThe engineer said he "
                            "was smart.", "Nothing gendered about the pilot here."])
    assert summary["sentences"] == 4 and summary["female_sentences"] == 2 and summary["male_sentences"] == 2
    assert summary["occupations"] == {"engineer": {"female": 0, "male": 1}, "nurse": {"female": 2, "male": 1}}
    assert summary["attributes"] == {"smart": {"female": 0, "male": 1}}
    assert "| nurse (occupation) | 2 | 1 | 67% |" in render_cooccurrence(summary)
