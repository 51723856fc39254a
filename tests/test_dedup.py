"""Exact and near-duplicate removal, keep-first semantics, resumable state, decontamination."""

import numpy as np
import pytest

from lmjax.corpus.dedup import Decontaminator, ExactDedup, NearDedup, dedup_config, exact_key
from lmjax.corpus.minhash import lsh_params, minhash_signatures


def corpus(docs: int = 2000, planted: int = 200, max_edit: float = 0.1, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(texts, is_planted): random Zipfian documents, then near-duplicate copies placed after their sources."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}x" for i in range(5000)]
    p = 1 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    texts = [[vocab[i] for i in rng.choice(len(vocab), rng.integers(50, 300), p=p)] for _ in range(docs)]
    stream = [(float(i), " ".join(words), False) for i, words in enumerate(texts)]
    for source in rng.integers(0, docs, planted):
        words = list(texts[source])
        for _ in range(max(1, int(rng.uniform(0, max_edit) * len(words)))):
            i, op = int(rng.integers(len(words))), rng.integers(3)
            if op == 0:
                words[i] = vocab[rng.choice(len(vocab), p=p)]
            elif op == 1:
                words.insert(i, vocab[rng.choice(len(vocab), p=p)])
            else:
                del words[i]
        stream.append((rng.uniform(source + 0.1, docs), " ".join(words), True))
    stream.sort(key=lambda s: s[0])
    return [t for _, t, _ in stream], np.array([planted for _, _, planted in stream])


@pytest.fixture(scope="module")
def planted_corpus():
    return corpus()


def run(near: NearDedup, texts: list[str], batch: int) -> np.ndarray:
    return np.concatenate([near.filter_batch(texts[i : i + batch]) for i in range(0, len(texts), batch)])


def test_config_defaults():
    c = dedup_config()
    assert (c.exact, c.near, c.threshold, c.num_perm, c.bands, c.rows, c.shingle) == (True, True, 0.5, 128, 0, 0, 3)
    assert (c.decontaminate.files, c.decontaminate.ngram) == ("", 13)
    assert NearDedup.from_config(c).bands * NearDedup.from_config(c).rows <= c.num_perm


def test_lsh_params_s_curve():
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= 0.95  # pairs at the threshold are candidates
        more = rows + 1  # a steeper curve would miss them
        assert 1 - (1 - threshold**more) ** (128 // more) < 0.95
    assert lsh_params(0.5, 128) == (42, 3)
    with pytest.raises(ValueError):
        lsh_params(0.0, 128)


def test_exact_normalisation():
    assert exact_key("Hello   World\n") == exact_key("hello world") == exact_key(" HELLO\tworld ")
    assert exact_key("hello world") != exact_key("hello, world")
    assert len(exact_key("x")) == 16
    exact = ExactDedup()
    texts = ["The cat", "the  CAT", "The dog", "the cat\n"]
    assert [exact.is_duplicate(t) for t in texts] == [False, True, False, True]
    assert len(exact) == 2


def test_exact_save_load(tmp_path):
    exact = ExactDedup()
    assert not any(exact.is_duplicate(t) for t in ["a", "b", "c"])
    exact.save(tmp_path / "exact.npz")
    loaded = ExactDedup.load(tmp_path / "exact.npz")
    assert len(loaded) == 3
    assert [loaded.is_duplicate(t) for t in ["A", "d", "b", "d"]] == [True, False, True, True]


def test_signatures_shape_seed_and_similarity():
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "The quick brown fox jumps over the lazy dog! " * 3]
    a = minhash_signatures(texts, num_perm=64, shingle=3, seed=1)
    assert a.shape == (2, 64) and a.dtype == np.uint32
    assert np.array_equal(a, minhash_signatures(texts, num_perm=64, shingle=3, seed=1))
    assert not np.array_equal(a, minhash_signatures(texts, num_perm=64, shingle=3, seed=2))
    assert np.array_equal(a[0], a[1])  # case and punctuation do not matter
    short = minhash_signatures(["hello world", "hello world", "hello there", ""], num_perm=64, shingle=3)
    assert np.array_equal(short[0], short[1]) and (short[0] != short[2]).mean() > 0.9


def test_near_recall_precision(planted_corpus):
    texts, planted = planted_corpus
    removed = ~run(NearDedup(), texts, batch=500)
    recall = (removed & planted).sum() / planted.sum()
    precision = (removed & planted).sum() / removed.sum()
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)


def test_decisions_do_not_depend_on_batches(planted_corpus):
    texts, _ = planted_corpus
    whole = run(NearDedup(), texts, batch=len(texts))
    for batch in (37, 700):
        assert np.array_equal(run(NearDedup(), texts, batch), whole)


def test_keep_first_chain():
    """B is a near-duplicate of A, C of B but not of A: A kept, B dropped, C kept (B was not kept)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, 128, dtype=np.uint32)
    b, c = a.copy(), a.copy()
    b[:38] += 1  # agrees with A on 90 / 128 = 0.70
    c[:38] += 1
    c[38:76] += 1  # agrees with B on 0.70, with A on 52 / 128 = 0.41
    for batches in ([[a, b, c]], [[a], [b], [c]], [[a, b], [c]]):
        near = NearDedup(threshold=0.5)
        keep = np.concatenate([near.filter_signatures(np.stack(batch)) for batch in batches])
        assert keep.tolist() == [True, False, True]
        assert len(near) == 2


def test_near_save_load_resumes_identically(planted_corpus, tmp_path):
    texts, _ = planted_corpus
    half = len(texts) // 2
    near = NearDedup(seed=3)
    expected = run(near, texts, batch=300)
    first = NearDedup(seed=3)
    run(first, texts[:half], batch=300)
    first.save(tmp_path / "near.npz")
    resumed = NearDedup.load(tmp_path / "near.npz")
    assert len(resumed) == len(first)
    assert (resumed.threshold, resumed.bands, resumed.rows, resumed.shingle, resumed.seed) == (0.5, 42, 3, 3, 3)
    tail = np.concatenate([resumed.filter_batch(texts[i : i + 300]) for i in range(half, len(texts), 300)])
    assert np.array_equal(np.concatenate([expected[:half], tail]), expected)
    state, after = near.state_dict(), resumed.state_dict()
    assert np.array_equal(state["signatures"], after["signatures"])


def test_near_is_deterministic(planted_corpus):
    texts, _ = planted_corpus
    assert np.array_equal(run(NearDedup(seed=7), texts[:800], 200), run(NearDedup(seed=7), texts[:800], 200))


def test_decontamination(tmp_path):
    question = "What is the boiling point of water at sea level in degrees Celsius, assuming standard pressure?"
    dec = Decontaminator([question, "too short"], ngram=13)
    assert len(dec) == len(question.split()) - 12
    leaked = "Trivia: what is the BOILING point of water at sea-level in degrees celsius assuming standard. Answer 100"
    twelve_words = "the boiling point of water at sea level in degrees Celsius assuming"
    assert dec.filter_batch([leaked, twelve_words, "too short", "unrelated text"]) == [False, True, True, True]

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "a.jsonl").write_text('{"question": "' + question + '", "answer": "100"}\n')
    (tmp_path / "b.txt").write_text("nothing to see here")
    from_files = Decontaminator.from_globs(f"{tmp_path}/eval/*.jsonl, {tmp_path}/b.txt", ngram=13)
    assert from_files.filter_batch([leaked, "nothing to see here"]) == [False, True]
    with pytest.raises(ValueError, match="matches no file"):
        Decontaminator.from_globs(f"{tmp_path}/missing/*.txt")
