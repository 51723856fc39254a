"""Generation metrics: predicted texts against one reference each, every metric with a bootstrap interval.

    bleu         corpus BLEU, sacrebleu's defaults (13a tokenizer, 4-grams, no smoothing), 0-100
    chrf         corpus chrF (character 6-grams, beta 2), sacrebleu's defaults, 0-100
    rouge1/2     mean ROUGE-1 / ROUGE-2 F1 over examples, rouge_score with its Porter stemmer, 0-1
    rouge_l      mean ROUGE-L F1 (longest common subsequence), the same way, 0-1
    meteor       mean METEOR (Banerjee & Lavie 2005, NLTK's formula and parameters), 0-1
    exact_match  share of predictions equal to their reference after case folding and collapsing
                 runs of whitespace (leading and trailing whitespace dropped), 0-1

Intervals are percentile bootstrap intervals over examples: the same `resamples` draws of example indices
(seeded) for every metric; corpus metrics (BLEU, chrF) are recomputed from the resampled sentence
statistics, mean metrics averaged over the resampled examples.
"""

import functools
import itertools
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF


class Estimate(NamedTuple):
    value: float  # the metric on all examples
    low: float  # bounds of the bootstrap confidence interval
    high: float


ROUGE_KEYS = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l"}  # rouge_score's name -> ours
WORD = re.compile(r"\w+|[^\w\s]")  # METEOR's words: runs of letters/digits, and single punctuation marks


def normalize(text: str) -> str:
    """What exact match compares: case-folded, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.casefold().split())


# ---------------------------------------------------------------- METEOR

# A matching stage: (key of a reference word, keys a hypothesis word may match). A hypothesis word matches a
# still unaligned reference word whose key is among its own keys.
Matcher = tuple[Callable[[str], str], Callable[[str], set[str]]]


PORTER = PorterStemmer()  # NLTK's default mode, as nltk.translate.meteor_score uses


@functools.cache
def _stem(word: str) -> str:
    return PORTER.stem(word)


@functools.cache
def wordnet_synonyms() -> Callable[[str], set[str]] | None:
    """word -> the word and its single-word WordNet synonyms, or None when NLTK's WordNet corpus is not
    installed (it is data, downloaded separately: `nltk.download("wordnet")`)."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        return None

    @functools.cache
    def synonyms(word: str) -> set[str]:
        names = {lemma.name() for synset in wordnet.synsets(word) for lemma in synset.lemmas()}
        return {name for name in names if "_" not in name} | {word}

    return synonyms


def meteor_matchers(synonyms: Callable[[str], set[str]] | None) -> dict[str, Matcher]:
    """METEOR's matching stages in the order they run: exact, Porter stem, and WordNet synonym if given."""
    stages = {"exact": (str, lambda w: {w}), "stem": (_stem, lambda w: {_stem(w)})}
    if synonyms is not None:
        stages["synonym"] = (str, synonyms)
    return stages


def align(hypothesis: Sequence[str], reference: Sequence[str],
          matchers: Sequence[Matcher]) -> list[tuple[int, int]]:
    """(hypothesis index, reference index) of aligned words, sorted. Stage by stage, the still unaligned
    hypothesis words, last first, each take the last unaligned reference word they match (NLTK's order:
    repeated words pair up from the end, without crossing each other)."""
    free_hyp, free_ref, pairs = set(range(len(hypothesis))), set(range(len(reference))), []
    for ref_key, hyp_keys in matchers:
        positions = defaultdict(list)  # key -> unaligned reference positions, ascending
        for j in sorted(free_ref):
            positions[ref_key(reference[j])].append(j)
        for i in sorted(free_hyp, reverse=True):
            keys = [k for k in hyp_keys(hypothesis[i]) if positions.get(k)]
            if keys:
                j = positions[max(keys, key=lambda k: positions[k][-1])].pop()
                free_hyp.remove(i)
                free_ref.remove(j)
                pairs.append((i, j))
    return sorted(pairs)


def meteor(prediction: str, reference: str, matchers: Sequence[Matcher], alpha: float = 0.9, beta: float = 3.0,
           gamma: float = 0.5) -> float:
    """METEOR of one prediction: with m aligned words, P = m / prediction words, R = m / reference words,
    Fmean = P R / (alpha P + (1 - alpha) R), and `chunks` the fewest runs of aligned words adjacent and in
    the same order on both sides, METEOR = Fmean (1 - gamma (chunks / m) ** beta); 0 without a match.
    Words are lower-cased `WORD` tokens."""
    hyp, ref = WORD.findall(prediction.lower()), WORD.findall(reference.lower())
    pairs = align(hyp, ref, matchers)
    m = len(pairs)
    if m == 0:
        return 0.0
    precision, recall = m / len(hyp), m / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum((i2, j2) != (i1 + 1, j1 + 1) for (i1, j1), (i2, j2) in itertools.pairwise(pairs))
    return fmean * (1 - gamma * (chunks / m) ** beta)


# ---------------------------------------------------------------- all metrics with intervals

def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] example indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _estimate(value: float, resampled: np.ndarray, confidence: float) -> Estimate:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high))


def generation_metrics(predictions: Sequence[str], references: Sequence[str], *, resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> dict:
    """Every metric of the module docstring as an `Estimate` (value, low, high), and under "meta": examples,
    resamples, confidence, seed, the METEOR matchers used (synonyms only where WordNet is installed) and the
    exact-match normalisation."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one: got {len(predictions)} "
                         f"and {len(references)}")
    index = bootstrap_indices(len(predictions), resamples, seed)
    out = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        # sacrebleu's own bootstrap (sacrebleu/significance.py) recomputes scores from these sentence statistics
        stats = np.array(metric._extract_corpus_statistics(predictions, [references]), np.float64)
        resampled = [metric._compute_score_from_stats(s).score for s in stats[index].sum(1)]
        out[name] = _estimate(metric._compute_score_from_stats(stats.sum(0)).score, np.array(resampled), confidence)

    examples = list(zip(predictions, references, strict=True))
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    rouge = [scorer.score(ref, pred) for pred, ref in examples]
    matchers = meteor_matchers(wordnet_synonyms())
    per_example = {ours: [r[key].fmeasure for r in rouge] for key, ours in ROUGE_KEYS.items()}
    per_example["meteor"] = [meteor(pred, ref, list(matchers.values())) for pred, ref in examples]
    per_example["exact_match"] = [normalize(pred) == normalize(ref) for pred, ref in examples]
    for name, scores in per_example.items():
        scores = np.asarray(scores, np.float64)
        out[name] = _estimate(scores.mean(), scores[index].mean(1), confidence)
    out["meta"] = {"examples": len(predictions), "resamples": resamples, "confidence": confidence, "seed": seed,
                   "meteor_matchers": list(matchers),
                   "exact_match": "case-folded, whitespace runs collapsed, ends stripped"}
    return out


def format_metrics(result: dict) -> str:
    """A small table of `generation_metrics`' result: one metric a line with its interval."""
    meta = result["meta"]
    lines = [f"{'metric':<12} {'value':>8}   {100 * meta['confidence']:.0f}% interval"]
    lines += [f"{name:<12} {est.value:8.3f}   [{est.low:.3f}, {est.high:.3f}]"
              for name, est in result.items() if isinstance(est, Estimate)]
    lines.append(f"{meta['examples']} examples; percentile bootstrap, {meta['resamples']} resamples, seed "
                 f"{meta['seed']}; METEOR matchers: {', '.join(meta['meteor_matchers'])}"
                 f"{'' if 'synonym' in meta['meteor_matchers'] else ' (no WordNet data installed)'}")
    return "\n".join(lines)
