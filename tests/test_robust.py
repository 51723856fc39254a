"""Robustness evaluation: seeded prompt noise (lmjax/text/noise.py), held-out loss under random and PGD embedding
perturbations, and `lmjax eval robust` on the tiny trained run."""

import itertools
import json
import re

import pytest

from lmjax.cli import main
from lmjax.corpus.chat_phrasings import MODULE_FOR, SIGNATURE, WHAT_DOES, WHICH_MODULE
from lmjax.eval.robust import evaluate_robust, lm_robustness
from lmjax.input.packing import eval_batches
from lmjax.input.specs import open_chunks
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir
from lmjax.text.noise import KINDS, is_code, perturb, synonyms

QUESTIONS = [t.format(q="email.mime.text", m="json", n="dumps")
             for t in WHAT_DOES + SIGNATURE + WHICH_MODULE + MODULE_FOR]
QUESTIONS += ["How do I remove duplicates from a list, and is there a fast way to keep the order?",
              "  Tell me  about\tthe `yield` keyword!  ", "What is the job of DateHeader in the module?"]


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_noise_is_seeded_and_strength_zero_is_the_identity():
    assert all(perturb(q, 0.0, seed) == q for q in QUESTIONS + ["", "   ", "word"] for seed in range(3))
    for q in QUESTIONS:
        assert perturb(q, 0.3, seed=7) == perturb(q, 0.3, seed=7)
    assert sum(perturb(q, 0.3, 1) != perturb(q, 0.3, 2) for q in QUESTIONS) > len(QUESTIONS) // 2
    with pytest.raises(ValueError):
        perturb("a b", 1.5)
    with pytest.raises(ValueError):
        perturb("a b", 0.5, kinds=("typo", "emoji"))


def test_stronger_noise_edits_more():
    distance = [sum(levenshtein(q, perturb(q, s, seed)) for q in QUESTIONS for seed in range(4))
                for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert distance == sorted(distance) and len(set(distance)) == len(distance), distance
    assert distance[0] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_text_and_leaves_code_alone(kind):
    changed = 0
    for q in QUESTIONS:
        noisy = perturb(q, 1.0, seed=3, kinds=(kind,))
        changed += noisy != q
        for word in q.split():
            if is_code(word):
                assert word.strip(".,?!") in noisy, (kind, q, noisy)
    assert changed > len(QUESTIONS) // 2, kind


def test_typos_edit_one_character_per_word():
    for q in QUESTIONS:
        noisy = perturb(q, 1.0, seed=5, kinds=("typo",))
        pairs = list(zip(q.split(), noisy.split(), strict=True))
        assert all(levenshtein(a, b) <= 2 for a, b in pairs)  # an adjacent swap is two Levenshtein edits
        assert sum(a != b for a, b in pairs) >= sum(not is_code(a) for a, _ in pairs) - 1  # "I" may double or not


def test_synonyms_come_from_the_shipped_list():
    table = synonyms()
    assert len(table) >= 100 and all(table.values())
    sentence = "Explain what the module does and give a brief summary"
    options = []
    for word in sentence.split():
        found = table.get(word.lower())
        options.append([(s[:1].upper() + s[1:]) if word[0].isupper() else s for s in found] if found else [word])
    allowed = {" ".join(choice) for choice in itertools.product(*options)}
    outputs = {perturb(sentence, 1.0, seed, kinds=("synonym",)) for seed in range(20)}
    assert outputs <= allowed and len(outputs) > 1


@pytest.fixture(scope="module")
def heldout(trained_run):
    """The trained run's model and its validation batches, as training evaluated them."""
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(trained_run[0]))
    batches = eval_batches(open_chunks(cfg.data.val, tokenizer, cfg.model.seq_len), cfg.model.seq_len,
                           cfg.train.batch_size, cfg.train.eval_steps)
    return cfg, graphdef, params, batches


def test_pgd_beats_random_noise_and_small_eps_is_clean(heldout):
    cfg, graphdef, params, batches = heldout
    result = lm_robustness(params, graphdef, batches, cfg.model.d_model, eps=(1e-6, 0.1, 0.3), steps=4)
    tiny, mid, big = result["eps"]
    clean = result["clean_loss"]
    assert abs(tiny["pgd_loss"] - clean) < 1e-3 and abs(tiny["random_loss"] - clean) < 1e-3
    for row in (mid, big):
        # the attack finds a direction much worse than a random one of the same length
        assert row["pgd_increase"] > 3 * max(row["random_increase"], 1e-3), result
    assert big["pgd_loss"] > mid["pgd_loss"] and big["random_loss"] >= mid["random_loss"] - 1e-3
    linf = lm_robustness(params, graphdef, batches[:1], cfg.model.d_model, eps=(0.3,), steps=2, norm="linf")
    assert linf["eps"][0]["pgd_increase"] > 0.05


def test_clean_loss_is_training_validation_and_chat_parts_skip(trained_run):
    workdir, trained = trained_run
    result = evaluate_robust(workdir, eps=(0.1,), attack_steps=1, batches=2)
    assert result["lm"]["clean_loss"] == pytest.approx(trained["val_loss"], rel=1e-4)
    assert result["chat"] is None and result["redteam"] is None
    assert any("not a chat run" in note for note in result["notes"])
    assert set(result["summary"]) == {"clean_loss", "random_loss@0.1", "pgd_loss@0.1"}


def test_cli_prints_the_tables_and_writes_json(trained_run, tmp_path, capsys):
    out = tmp_path / "robust.json"
    assert main(["eval", "robust", "--workdir", str(trained_run[0]), "--eps", "0.2", "--attack-steps", "2",
                 "--strengths", "0.2,0.5", "--questions", "6", "--chat", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\s+0\.2\s+[\d.]+\s+[+-][\d.]+\s+[\d.]+\s+\+[\d.]+$", printed, re.MULTILINE), printed
    assert "red-team attack success rate" in printed and "chat ROUGE-L" in printed
    result = json.loads(out.read_text())
    chat, red = result["chat"], result["redteam"]
    assert chat["questions"] == 6 and [r["strength"] for r in chat["strengths"]] == [0.2, 0.5]
    assert chat["strengths"][1]["changed"] > 0.5 and 0.0 <= chat["rouge_l"] <= 1.0
    assert red["attack_success_rate"] == pytest.approx(sum(red["categories"].values()) / len(red["categories"]))
    assert "benign" not in red["categories"]
    assert result["summary"]["rouge_l@0.5"] == chat["strengths"][1]["rouge_l"]
