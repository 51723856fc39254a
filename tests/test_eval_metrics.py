"""Generation metrics against their reference implementations and a hand-worked METEOR, and their intervals."""

import pytest
import sacrebleu
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer

from lmjax.eval.metrics import WORD, Estimate, generation_metrics, meteor, meteor_matchers, normalize, wordnet_synonyms

PREDICTIONS = [
    "The cat sat on the mat.", "Returns the absolute value of a number.", "It opens a file and returns a stream.",
    "Split the string at the first separator.", "A dog barked loudly at the mailman", "Return a sorted list.",
    "The function raises ValueError when the input is empty.", "hello world", "Create a new thread.",
    "Encode the string using the codec registered for encoding.", "no idea", "Join paths with the separator.",
]
REFERENCES = [
    "The cat is sitting on the mat.", "Return the absolute value of the number.", "Open file and return a stream.",
    "Split the string at the last separator.", "The dog barks at the mailman.", "Return a new sorted list.",
    "Raises ValueError if the input is empty.", "Hello  World", "Start a new thread.",
    "Encode the object using the codec registered for encoding.", "It computes the hash of the data.",
    "Join two or more path components.",
]
NO_SYNONYMS = list(meteor_matchers(None).values())


class NoWordNet:
    """Stands in for NLTK's WordNet reader: no synonyms, so NLTK's METEOR runs without the corpus."""

    def synsets(self, word):
        return []


@pytest.fixture(scope="module")
def result():
    return generation_metrics(PREDICTIONS, REFERENCES)


def test_bleu_and_chrf_are_sacrebleus_corpus_scores(result):
    assert result["bleu"].value == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert result["chrf"].value == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    assert 0 < result["bleu"].value < 100 and 0 < result["chrf"].value < 100


def test_rouge_is_rouge_scores_mean_f1(result):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True)]
    for key, ours in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rouge_l")):
        assert result[ours].value == pytest.approx(sum(s[key].fmeasure for s in scores) / len(scores))


def test_meteor_hand_worked_example():
    # hypothesis: the(0) cats(1) sat(2) on(3) the(4) mat(5)  -- 6 words
    # reference:  the(0) cat(1)  sat(2) on(3) mat(4)         -- 5 words
    # exact stage, hypothesis words last first, each taking the last free equal reference word:
    #   mat 5->4, the 4->0, on 3->3, sat 2->2; cats has no equal word; the(0) finds no free "the" left
    # stem stage: stem(cats) = cat = stem(cat): cats 1->1.  m = 5 aligned words
    # P = 5/6, R = 5/5 = 1, Fmean = P R / (0.9 P + 0.1 R) = (5/6) / (0.75 + 0.1) = 50/51
    # sorted by hypothesis: (1,1) (2,2) (3,3) | (4,0) | (5,4) -> 3 chunks; penalty = 0.5 (3/5)^3 = 0.108
    # METEOR = 50/51 * (1 - 0.108) = 44.6/51
    assert meteor("the cats sat on the mat", "the cat sat on mat", NO_SYNONYMS) == pytest.approx(44.6 / 51)
    # exact matching alone: m = 4, P = 4/6, R = 4/5, Fmean = (8/15) / (0.6 + 0.08) = 40/51;
    # (2,2) (3,3) | (4,0) | (5,4) -> 3 chunks, penalty 0.5 (3/4)^3 = 27/128
    exact_only = [meteor_matchers(None)["exact"]]
    assert meteor("the cats sat on the mat", "the cat sat on mat", exact_only) == pytest.approx(40 / 51 * 101 / 128)
    assert meteor("nothing shared", "the cat", NO_SYNONYMS) == 0.0
    assert meteor("The cat.", "the cat .", NO_SYNONYMS) == pytest.approx(1 - 0.5 / 27)  # one chunk of 3 words


def test_meteor_equals_nltks_without_wordnet():
    for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True):
        expected = single_meteor_score(WORD.findall(ref), WORD.findall(pred), wordnet=NoWordNet())
        assert meteor(pred, ref, NO_SYNONYMS) == pytest.approx(expected), (pred, ref)


def test_matchers_used_are_reported(result):
    expected = ["exact", "stem"] + (["synonym"] if wordnet_synonyms() else [])
    assert result["meta"]["meteor_matchers"] == expected
    assert result["meta"]["resamples"] == 1000 and result["meta"]["seed"] == 0


def test_exact_match_folds_case_and_whitespace(result):
    assert normalize("  Hello \n World ") == normalize("hello world") == "hello world"
    assert normalize("hello, world") != normalize("hello world")
    assert result["exact_match"].value == pytest.approx(1 / len(PREDICTIONS))  # only "hello world"


def test_intervals_contain_the_estimate_narrow_with_more_examples_and_repeat(result):
    more = generation_metrics(PREDICTIONS * 4, REFERENCES * 4)
    for name, est in result.items():
        if isinstance(est, Estimate):
            assert est.low <= est.value <= est.high and est.low < est.high, (name, est)
            assert more[name].value == pytest.approx(est.value), name  # same corpus statistics, repeated
            assert more[name].high - more[name].low < est.high - est.low, name
    assert generation_metrics(PREDICTIONS, REFERENCES) == result
    assert generation_metrics(PREDICTIONS, REFERENCES, seed=1)["rouge_l"] != result["rouge_l"]


def test_intervals_are_degenerate_when_every_example_scores_the_same():
    same = generation_metrics(["the cats sat on the mat"] * 10, ["the cat sat on mat"] * 10, resamples=200)
    for name, est in same.items():
        if isinstance(est, Estimate):
            assert est.low == est.high == pytest.approx(est.value), (name, est)
    assert same["meteor"].value == pytest.approx(44.6 / 51) and same["exact_match"].value == 0


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="as many predictions as references"):
        generation_metrics(["a"], ["a", "b"])
