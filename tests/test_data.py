"""Tests for lmjax.data: sources, stdlib corpus, tokenizer, chunking, packing, iterator state."""

import json
from collections import Counter

import grain
import numpy as np
import pytest

from lmjax.config import DataError
from lmjax.corpus import stdlib_docs as stdlib_corpus
from lmjax.corpus.sources import VAL_MIN_CHARS, read_documents, split_train_val
from lmjax.input.chunks import tokenize_documents
from lmjax.input.packing import eval_batches, train_iterator
from lmjax.run.workdir import read_metrics
from lmjax.text.io import read_jsonl
from lmjax.text.tokenizer import (
    BYTE_PIECES,
    FORMAT,
    FORMAT_FILE,
    META_PIECES,
    SPACE_MARK,
    SPECIAL_TOKENS,
    Tokenizer,
    describe_size,
    train_tokenizer,
)

KEYS = ("inputs", "targets", "segment_ids", "positions")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_corpus.stdlib_documents()


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(corpus[:1500], vocab_size=1024, out_dir=tmp_path_factory.mktemp("tok"))


def synthetic_chunks(n: int, seq_len: int, seed: int = 0) -> list[np.ndarray]:
    """Chunks with globally unique token values, so every packed segment identifies its chunk."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, seq_len + 2, size=n)
    return [np.arange(1000 * (i + 1), 1000 * (i + 1) + m, dtype=np.int32) for i, m in enumerate(lengths)]


def row_segments(batch: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """Reassemble the chunk behind every packed segment of a batch, checking the row layout."""
    out = []
    for inputs, targets, seg, pos in zip(*(batch[k] for k in KEYS), strict=True):
        used = int((seg != 0).sum())
        assert (seg[:used] != 0).all() and (seg[used:] == 0).all(), "padding must be trailing"
        for arr in (inputs, targets, pos):
            assert (arr[used:] == 0).all(), "padding must be all zeros"
        if used == 0:
            continue
        assert seg[0] == 1 and (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
        for s in range(1, int(seg.max(initial=0)) + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            np.testing.assert_array_equal(inputs[idx][1:], targets[idx][:-1])  # shift stays inside segment
            out.append((*inputs[idx].tolist(), int(targets[idx][-1])))
    return out


# --- stdlib corpus and sources ---------------------------------------------------------------


def test_stdlib_corpus_nontrivial(corpus):
    assert len(corpus) > 3000
    assert sum(map(len, corpus)) > 1_500_000
    assert len(set(corpus)) == len(corpus)
    assert min(map(len, corpus)) >= stdlib_corpus.MIN_DOC_CHARS
    assert any("JSON formatted" in d for d in corpus)
    topics = stdlib_corpus.topic_documents()
    assert len(topics) > 50 and set(t for t in topics if len(t) >= stdlib_corpus.MIN_DOC_CHARS) <= set(corpus)
    files = stdlib_corpus.stdlib_files()
    assert not any(part in stdlib_corpus.SKIP_DIRS for f in files for part in f.parts[-4:-1])
    assert any(f.as_posix().endswith("json/__init__.py") for f in files)


def test_stdlib_extraction_is_deterministic(corpus):
    files = [f for f in stdlib_corpus.stdlib_files() if f.name in ("textwrap.py", "shlex.py")]
    first = stdlib_corpus.extract_documents(files)
    assert first == stdlib_corpus.extract_documents(files)
    assert all(d in set(corpus) for d in first)
    assert all(d == d.strip("\n") and not any(line.endswith(" ") for line in d.split("\n")) for d in first)


def test_stdlib_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path))
    small = [f for f in stdlib_corpus.stdlib_files() if f.name == "textwrap.py"]
    monkeypatch.setattr(stdlib_corpus, "stdlib_files", lambda: small)
    docs = stdlib_corpus.stdlib_documents()
    assert stdlib_corpus.cache_path().parent == tmp_path and stdlib_corpus.cache_path().exists()
    assert list(tmp_path.iterdir()) == [stdlib_corpus.cache_path()], "no temp files left behind"

    def fail():
        raise AssertionError("must read the cache")

    monkeypatch.setattr(stdlib_corpus, "extract_documents", fail)
    assert stdlib_corpus.stdlib_documents() == docs
    stdlib_corpus.cache_path().write_text("{broken")
    monkeypatch.setattr(stdlib_corpus, "extract_documents", lambda: ["re-extracted document"])
    assert stdlib_corpus.stdlib_documents() == ["re-extracted document"]


def test_stdlib_train_val_split(corpus):
    train, val = list(read_documents("stdlib")), list(read_documents("stdlib:val"))
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(corpus)
    assert len(val) >= 0.02 * len(corpus) and sum(map(len, val)) >= VAL_MIN_CHARS
    assert len(val) < 0.2 * len(corpus)
    assert val == list(read_documents("stdlib:val"))


def test_split_train_val_small():
    docs = [f"document number {i}" for i in range(1000)]
    train, val = split_train_val(docs, fraction=0.05, min_chars=0)
    assert len(val) == 50 and len(train) == 950 and not set(train) & set(val)
    assert val == [d for d in docs if d in set(val)], "val keeps corpus order"
    train2, val2 = split_train_val(docs, fraction=0.0, min_chars=500)
    assert sum(map(len, val2)) >= 500 and set(val2) <= set(docs)


def test_text_source(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second\n  indented\n")
    (tmp_path / "a.txt").write_bytes(b"first \xff\xfe bytes\n")
    (tmp_path / "sub" / "c.txt").write_text("nested ünïcode")
    (tmp_path / "empty.txt").write_text("")
    docs = list(read_documents(f"text:{tmp_path}/**/*.txt"))
    assert docs == ["first \ufffd\ufffd bytes\n", "second\n  indented\n", "nested ünïcode"]


def test_jsonl_source(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = ['{"text": "one"}', "{broken", '{"other": "x"}', "", '{"text": "two\\nlines", "body": "b"}', "[1]"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as record:
        docs = list(read_documents(f"jsonl:{path}"))
    assert docs == ["one", "two\nlines"]
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert f"{path}:2" in messages[0] and f"{path}:3" in messages[1] and f"{path}:6" in messages[2]
    with pytest.warns(UserWarning):
        assert list(read_documents(f"jsonl:{tmp_path}/*.jsonl:body")) == ["b"]


def test_the_jsonl_reader_names_a_bad_line_or_skips_a_torn_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # A run killed mid-write, then resumed: its torn line has the next record appended to it.
    path.write_text('{"step": 1}\n{"step": 2, "lo{"step": 2}\n\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        list(read_jsonl(path))
    assert [where for where, _ in read_jsonl(path, skip_invalid=True)] == [f"{path}:1", f"{path}:4"]
    assert read_metrics(path) == [{"step": 1}, {"step": 3}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_jsonl_without_usable_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n')
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"content": "no text field"}\nnot json\n')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="b.jsonl"):
        list(read_documents(f"jsonl:{tmp_path}/*.jsonl"))


@pytest.mark.parametrize("spec", ["", "stdlib:test", "nope:x", "text:", "text:/no/such/dir/*.txt", "jsonl:/no/*.jsonl"])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match="valid forms") as err:
        read_documents(spec)
    assert repr(spec) in str(err.value)


# --- tokenizer -------------------------------------------------------------------------------

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "multiple   spaces\n\n\nand blank lines\n",
    "\ttabs\tinside\t\n\t\tnested",
    "windows\r\nline\r\nends",
    "digits 0123456789 and 3.14159e-10",
    "ünïcödé, 日本語, emoji 🎉🐍, math ∑ ≠ ∞, nbsp\u00a0here",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n",
    "",
    "\n",
    "chat markers are plain text here: <|system|><|user|> hi <|assistant|><|end|>",
    "SentencePiece's space mark \u2581 stays itself:\u2581\u2581 \u2581",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert int(tokenizer.token_bytes()[ids].sum()) == len(text.encode())


def test_token_bytes_on_real_text(tokenizer, corpus):
    table = tokenizer.token_bytes()
    assert table.shape == (tokenizer.vocab_size,) and table.dtype == np.int32
    assert table[[tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.special_ids.values()]].sum() == 0
    docs = corpus[2000:2300] + ["Ünïcode\n\tand emoji 🎉 — “quotes”\n\n  end  "]
    for doc, ids in zip(docs, tokenizer.encode_batch(docs), strict=True):
        assert int(table[ids].sum()) == len(doc.encode())
        assert tokenizer.decode(ids) == doc
    assert sum(map(len, docs)) / sum(len(i) for i in tokenizer.encode_batch(docs)) > 2.0, "should compress"


def test_tokenizer_ids_and_specials(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert set(tokenizer.special_ids) == set(SPECIAL_TOKENS)
    assert sorted(tokenizer.special_ids.values()) == [4, 5, 6, 7]
    ids = tokenizer.encode("hello")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert len(tokenizer.encode("9876543210")) == 10, "digits are split"
    user, end = tokenizer.special_ids["<|user|>"], tokenizer.special_ids["<|end|>"]
    for marker, marker_id in tokenizer.special_ids.items():
        assert marker_id not in tokenizer.encode(marker) and tokenizer.decode(tokenizer.encode(marker)) == marker
        assert tokenizer.decode([marker_id]) == "" and tokenizer.token_bytes()[marker_id] == 0
    assert tokenizer.decode([tokenizer.bos_id, user, *ids, end, tokenizer.eos_id, tokenizer.pad_id]) == "hello"
    assert tokenizer.decode(np.array(ids)) == "hello"
    assert tokenizer.decode([*ids, tokenizer.vocab_size + 5]) == "hello", "padded-vocab ids are ignored"


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    assert json.loads((tmp_path / FORMAT_FILE).read_text()) == {"format": FORMAT}
    loaded = Tokenizer.load(tmp_path)
    text = "Return the number of items.\n\n  x = 42"
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.vocab_size == tokenizer.vocab_size
    assert Tokenizer.load(tmp_path / "tokenizer.model").encode(text) == tokenizer.encode(text)
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        Tokenizer.load(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=str(corrupt / "tokenizer.model")):
        Tokenizer.load(corrupt)


@pytest.mark.parametrize("kind", ["bpe", "char", "unigram"])
def test_encode_by_words_equals_sentencepiece_on_whole_texts(corpus, tmp_path, kind):
    tok = train_tokenizer(corpus[:300], vocab_size=600, out_dir=tmp_path, kind=kind)
    assert (tok._word_ids is None) == (kind == "unigram"), "unigram segments whole texts, not word by word"
    texts = [t for t in ROUND_TRIP_TEXTS if SPACE_MARK not in t] + corpus[300:600] + ["  lead", "trail  ", " "]
    whole = tok.sp.encode(texts, out_type=int)
    assert tok.encode_batch(texts) == whole
    assert tok.encode_batch(texts[::-1]) == whole[::-1], "a second pass (words looked up) gives the same ids"
    assert [tok.encode(t) for t in texts[:20]] == whole[:20]


@pytest.mark.parametrize("kind", ["unigram", "char"])
def test_other_tokenizer_kinds(corpus, tmp_path, kind):
    tok = train_tokenizer(corpus[:300], vocab_size=600, out_dir=tmp_path, kind=kind)
    assert (tmp_path / "tokenizer.model").exists() and (tmp_path / FORMAT_FILE).exists()
    text = "Other kinds round-trip too:\n\t 12 ü 🎉"
    assert tok.decode(tok.encode(text)) == text
    assert int(tok.token_bytes()[tok.encode(text)].sum()) == len(text.encode())


def test_char_tokenizer_is_sized_to_the_characters_seen(tmp_path):
    docs = ["the cat sat on the mat\n" * 100, "°"]  # "°": 1 in 2301 characters, under SentencePiece's default coverage
    seen = set("".join(docs))
    small = train_tokenizer(docs, vocab_size=300, out_dir=tmp_path / "small", kind="char")
    big = train_tokenizer(docs, vocab_size=4096, out_dir=tmp_path / "big", kind="char")
    assert small.vocab_size == big.vocab_size == len(seen) + BYTE_PIECES + META_PIECES
    text = "the mat° sat on the cat\n"
    assert len(big.encode(text)) == len(text), "each character seen is one token"
    pieces = {big.sp.id_to_piece(i).replace(SPACE_MARK, " ") for i in range(big.vocab_size)}
    assert seen <= pieces and set(SPECIAL_TOKENS) <= pieces
    unseen = f"Zürich {SPACE_MARK}🎉\t"
    assert big.decode(big.encode(unseen)) == unseen, "unseen characters go through byte fallback"
    assert describe_size(big, "char", 4096).startswith(f"{big.vocab_size} tokens: {len(seen)} characters seen")


def test_train_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["text"], 300, tmp_path, kind="wordpiece")
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([], 300, tmp_path)


# --- chunking, packing, iterators ------------------------------------------------------------


def test_tokenize_documents_chunking(tokenizer, corpus):
    seq_len = 16
    docs = corpus[:40] + ["x", ""]
    all_chunks = tokenize_documents(docs, tokenizer, seq_len)
    assert all(c.dtype == np.int32 and 2 <= len(c) <= seq_len + 1 for c in all_chunks)
    n_chunks = 0
    for doc in docs:
        tokens = [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]
        chunks = tokenize_documents([doc], tokenizer, seq_len)
        n_chunks += len(chunks)
        assert len(chunks) == -(-(len(tokens) - 1) // seq_len)
        for a, b in zip(chunks, chunks[1:], strict=False):
            assert len(a) == seq_len + 1 and a[-1] == b[0], "full chunks overlap by exactly one token"
        assert np.concatenate([c[1:] for c in chunks]).tolist() == tokens[1:], "each target exactly once"
        assert np.concatenate([c[:-1] for c in chunks]).tolist() == tokens[:-1]
    assert n_chunks == len(all_chunks)


def test_packing_layout():
    seq_len, chunks = 32, synthetic_chunks(50, 32)
    known = {tuple(c.tolist()) for c in chunks}
    it = train_iterator(chunks, seq_len=seq_len, batch_size=4, seed=0)
    packed_rows = 0
    for _ in range(8):
        batch = next(it)
        assert set(batch) == set(KEYS)
        assert all(batch[k].shape == (4, seq_len) and batch[k].dtype == np.int32 for k in KEYS)
        packed_rows += int((batch["segment_ids"].max(axis=1) > 1).sum())
        assert set(row_segments(batch)) <= known, "every segment is exactly one whole chunk"
    assert packed_rows > 0, "short chunks must share rows"


def test_train_iterator_epochs():
    n, chunks = 200, synthetic_chunks(200, 16, seed=1)
    index = {tuple(c.tolist()): i for i, c in enumerate(chunks)}
    it = train_iterator(chunks, seq_len=16, batch_size=4, seed=3)
    seen = []
    while len(seen) < 3 * n:
        seen += [index[s] for s in row_segments(next(it))]
    counts = Counter(seen[: 2 * n])
    assert set(counts) == set(range(n)), "every chunk is seen within two epochs"
    assert all(1 <= c <= 3 for c in counts.values())
    order = [seen[:n], seen[n : 2 * n]]
    displacement = [np.abs(np.array(o) - np.arange(n)).mean() for o in order]
    assert min(displacement) > n / 6, "shuffled, not in source order"
    first_pos = {i: p for p, i in reversed(list(enumerate(order[0])))}
    second_pos = {i: p for p, i in reversed(list(enumerate(order[1])))}
    common = sorted(set(first_pos) & set(second_pos))
    corr = np.corrcoef([first_pos[i] for i in common], [second_pos[i] for i in common])[0, 1]
    assert abs(corr) < 0.5, "reshuffled each epoch"


def test_train_iterator_seeds():
    chunks = synthetic_chunks(40, 16, seed=2)
    a, b, c = (train_iterator(chunks, 16, 2, seed=s) for s in (5, 5, 6))
    batches = [[next(x)["inputs"] for _ in range(5)] for x in (a, b, c)]
    assert all(np.array_equal(x, y) for x, y in zip(batches[0], batches[1], strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(batches[0], batches[2], strict=True))


@pytest.mark.parametrize("skip", [0, 3, 11])
def test_train_iterator_resume(skip):
    chunks = synthetic_chunks(20, 16, seed=4)  # a few batches per epoch: resuming crosses epochs
    it1 = train_iterator(chunks, seq_len=16, batch_size=2, seed=7)
    for _ in range(skip):
        next(it1)
    state = json.loads(json.dumps(it1.get_state()))
    it2 = train_iterator(chunks, seq_len=16, batch_size=2, seed=7)
    next(it2)
    it2.set_state(state)
    for _ in range(25):
        b1, b2 = next(it1), next(it2)
        for k in KEYS:
            np.testing.assert_array_equal(b1[k], b2[k])


def test_train_iterator_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    chunks = synthetic_chunks(30, 16, seed=5)
    it = train_iterator(chunks, seq_len=16, batch_size=2, seed=1)
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(6)]
    fresh = train_iterator(chunks, seq_len=16, batch_size=2, seed=1)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected:
        got = next(fresh)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])


def test_loader_sharding_is_disjoint():
    chunks = synthetic_chunks(24, 16, seed=6)
    seen = []
    for p in range(2):
        it = train_iterator(chunks, seq_len=16, batch_size=2, seed=0, loader_index=p, loader_count=2)
        segs = set()
        for _ in range(20):
            segs |= set(row_segments(next(it)))
        assert segs == {tuple(c.tolist()) for c in chunks[p::2]}
        seen.append(segs)
    assert not seen[0] & seen[1]


def test_iterator_rejects_bad_chunks():
    with pytest.raises(ValueError, match="seq_len"):
        train_iterator([np.arange(20, dtype=np.int32)], seq_len=16, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="no token chunks"):
        train_iterator([], seq_len=16, batch_size=2, seed=0)


def test_eval_batches():
    chunks = synthetic_chunks(60, 16, seed=8)
    batches = eval_batches(chunks, seq_len=16, batch_size=4, num_batches=3)
    assert len(batches) == 3
    again = eval_batches(chunks, seq_len=16, batch_size=4, num_batches=3)
    for a, b in zip(batches, again, strict=True):
        assert all(a[k].shape == (4, 16) and a[k].dtype == np.int32 for k in KEYS)
        assert all(np.array_equal(a[k], b[k]) for k in KEYS)
    everything = eval_batches(chunks, seq_len=16, batch_size=4, num_batches=1000)
    assert len(everything) < 1000
    segs = [s for b in everything for s in row_segments(b)]
    assert sorted(segs) == sorted(tuple(c.tolist()) for c in chunks), "all data, each chunk exactly once"


def test_eval_batches_tiny_and_sharded():
    tiny = synthetic_chunks(1, 8)
    (batch,) = eval_batches(tiny, seq_len=16, batch_size=4, num_batches=5)
    assert batch["inputs"].shape == (4, 16)
    assert (batch["segment_ids"][1:] == 0).all() and (batch["inputs"][1:] == 0).all()
    assert row_segments(batch) == [tuple(tiny[0].tolist())]

    chunks = synthetic_chunks(45, 16, seed=9)
    shards = [eval_batches(chunks, 16, 2, 1000, process_index=p, process_count=2) for p in range(2)]
    assert len(shards[0]) == len(shards[1]), "every process runs the same number of eval steps"
    segs = [set(s for b in shard for s in row_segments(b)) for shard in shards]
    assert not segs[0] & segs[1]
    assert segs[0] | segs[1] == {tuple(c.tolist()) for c in chunks}
