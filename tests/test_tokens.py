"""Token shards (lmjax/input/tokens.py): writing, reading by index, refusal of other tokenizers and chunkings,
the cache of raw specs, and the data order and loader guarantees when training reads them."""

import json

import numpy as np
import pytest

from lmjax.cli import main
from lmjax.config import DataError
from lmjax.corpus import stdlib_docs
from lmjax.corpus.sources import read_documents
from lmjax.eval.baselines import unigram_bpb, unigram_bpb_from_counts
from lmjax.input import tokens as tokens_module
from lmjax.input.chunks import tokenize_conversations, tokenize_documents
from lmjax.input.loaders import Loaders
from lmjax.input.packing import eval_batches, train_iterator
from lmjax.input.pairs import eval_pair_batches, pair_batches, pair_chunks, pair_row, split_heldout
from lmjax.input.specs import open_chunks, open_pairs, token_shards, tokenize_sources
from lmjax.input.tokens import open_tokens, read_manifest, write_tokens
from lmjax.text.tokenizer import Tokenizer, train_tokenizer

SEQ_LEN = 32
CONVERSATION = [{"role": "user", "content": "What does len() return?"},
                {"role": "assistant", "content": "The number of items in a container."}]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stdlib_docs.stdlib_documents()[:400]


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(docs, vocab_size=512, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def text_spec(docs, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("text")
    for i in range(4):
        (folder / f"part{i}.txt").write_text("\n\n".join(docs[i::4]))
    return f"text:{folder}/*.txt"


def _equal_batches(a, b, n: int = 6) -> None:
    for _ in range(n):
        x, y = next(a), next(b)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("workers", [1, 2])
def test_token_shards_hold_the_chunks_of_the_source_in_order(docs, tokenizer, tmp_path, workers, monkeypatch):
    monkeypatch.setattr(tokens_module, "SHARD_TOKENS", 5000)  # several shards, of several tasks each
    monkeypatch.setattr(tokens_module, "BATCH_ITEMS", {"documents": 16})
    manifest = write_tokens(tmp_path / "t", {"train": lambda: iter(docs), "val": lambda: iter(docs[:7])},
                            tokenizer, SEQ_LEN, workers=workers, log=lambda _: None)
    expected = tokenize_documents(docs, tokenizer, SEQ_LEN)
    chunks = open_tokens(tmp_path / "t", "train", tokenizer, SEQ_LEN)
    assert len(manifest["splits"]["train"]["shards"]) > 2 and len(chunks) == len(expected)
    for i in (0, 1, len(expected) // 2, len(expected) - 1):
        assert chunks[i].dtype == np.int32
        np.testing.assert_array_equal(chunks[i], expected[i])
    assert [c.tolist() for c in chunks] == [c.tolist() for c in expected]
    assert chunks.tokens == sum(len(c) - 1 for c in expected)
    targets = np.concatenate([c[1:] for c in expected])
    np.testing.assert_array_equal(chunks.unigram, np.bincount(targets, minlength=tokenizer.vocab_size))
    assert len(open_tokens(tmp_path / "t", "val", tokenizer, SEQ_LEN)) == len(tokenize_documents(docs[:7], tokenizer,
                                                                                                 SEQ_LEN))
    assert (tmp_path / "t" / "tokenizer" / "tokenizer.model").read_bytes() == tokenizer.model_proto


def test_chat_shards_carry_the_loss_mask(tokenizer, tmp_path):
    conversations = [CONVERSATION, [*CONVERSATION, {"role": "user", "content": "And for a dict?"},
                                    {"role": "assistant", "content": "The number of keys."}]] * 3
    write_tokens(tmp_path / "c", {"train": lambda: conversations}, tokenizer, 64, kind="chat", log=lambda _: None)
    chunks = open_tokens(tmp_path / "c", "train", tokenizer, 64)
    expected = tokenize_conversations(conversations, tokenizer, 64)
    assert chunks.masked and len(chunks) == len(expected) == 6
    for got, want in zip(chunks, expected, strict=True):
        assert got.shape == want.shape and got.shape[0] == 2
        np.testing.assert_array_equal(got, want)
    batch = next(train_iterator(chunks, 64, 2, seed=0))
    assert "loss_mask" in batch and 0 < batch["loss_mask"].sum() < (batch["segment_ids"] > 0).sum()
    masked = [c[0, 1:][c[1, 1:] == 1] for c in expected]
    np.testing.assert_array_equal(chunks.unigram, np.bincount(np.concatenate(masked), minlength=tokenizer.vocab_size))


def test_other_tokenizer_or_chunking_is_refused(docs, tokenizer, tmp_path):
    write_tokens(tmp_path / "t", {"train": lambda: docs[:20]}, tokenizer, SEQ_LEN, log=lambda _: None)
    other = train_tokenizer(docs[:200], vocab_size=400, out_dir=tmp_path / "other")
    with pytest.raises(DataError, match="made with another tokenizer .*lmjax data tokenize"):
        open_tokens(tmp_path / "t", "train", other, SEQ_LEN)
    with pytest.raises(DataError, match=f"chunked for seq_len {SEQ_LEN}, this run has model.seq_len 64"):
        open_chunks(str(tmp_path / "t"), tokenizer, 64)
    with pytest.raises(DataError, match="no split 'val'"):
        open_chunks(f"{tmp_path / 't'}:val", tokenizer, SEQ_LEN)
    assert len(open_chunks(str(tmp_path / "t"), tokenizer, SEQ_LEN)) == len(tokenize_documents(docs[:20], tokenizer,
                                                                                               SEQ_LEN))


def test_raw_specs_are_tokenized_once_into_the_cache(text_spec, docs, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path / "cache"))
    writes = []
    real = tokens_module.write_tokens
    monkeypatch.setattr(tokens_module, "write_tokens", lambda *a, **k: writes.append(a[0]) or real(*a, **k))
    first = open_chunks(text_spec, tokenizer, SEQ_LEN, log=lambda _: None)
    again = open_chunks(text_spec, tokenizer, SEQ_LEN, log=lambda _: None)
    assert len(writes) == 1 and first.directory == again.directory
    assert first.directory.parent == tmp_path / "cache" / "tokens"
    open_chunks(text_spec, tokenizer, 16, log=lambda _: None)  # another seq_len: another entry
    assert len(writes) == 2
    part = text_spec.removeprefix("text:").replace("*", "part0")
    with open(part, "a") as f:
        f.write("\n\nA new paragraph of text.")
    changed = open_chunks(text_spec, tokenizer, SEQ_LEN, log=lambda _: None)
    assert len(writes) == 3 and changed.directory != first.directory and len(changed) == len(first) + 1
    before = {spec: tokens_module.cache_key(spec, tokenizer, SEQ_LEN) for spec in ("stdlib", "chat:stdlib")}
    monkeypatch.setattr("lmjax.corpus.stdlib_chat.CHAT_CORPUS_VERSION", -1)  # lmjax builds its chat data anew
    monkeypatch.setattr("lmjax.corpus.stdlib_docs.CORPUS_VERSION", -1)
    assert all(tokens_module.cache_key(spec, tokenizer, SEQ_LEN) != key for spec, key in before.items())


def test_same_batches_from_raw_spec_token_dir_and_memory(text_spec, tokenizer, tmp_path, monkeypatch):
    """A run reads the same data in the same order from the raw spec (through the cache), from token shards made
    from it, and (as before token shards) from the chunks in memory."""
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path / "cache"))
    tokenize_sources(text_spec, "", tokenizer, SEQ_LEN, tmp_path / "shards", workers=2, log=lambda _: None)
    assert token_shards(str(tmp_path / "shards")) == (tmp_path / "shards", "train")
    from_dir = open_chunks(str(tmp_path / "shards"), tokenizer, SEQ_LEN)
    from_spec = open_chunks(text_spec, tokenizer, SEQ_LEN, log=lambda _: None)
    in_memory = tokenize_documents(read_documents(text_spec), tokenizer, SEQ_LEN)
    for k in range(2):
        batches = [[next(it) for _ in range(6)] for it in (
            train_iterator(c, SEQ_LEN, 4, seed=3, loader_index=k, loader_count=2)
            for c in (from_dir, from_spec, in_memory))]
        _equal_batches(iter(batches[0]), iter(batches[1]))
        _equal_batches(iter(batches[1]), iter(batches[2]))
    a, b = (eval_batches(c, SEQ_LEN, 4, 3) for c in (from_dir, in_memory))
    for x, y in zip(a, b, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


def _loaders(chunks, count: int, process_index: int = 0, process_count: int = 1) -> Loaders:
    make = lambda k, n, rows: train_iterator(chunks, SEQ_LEN, rows, 0, k, n)
    return Loaders(make, count, 8, 2, process_index, process_count, {"data": "test"})


def test_loaders_over_token_shards_do_not_depend_on_the_process_count(docs, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("lmjax.input.loaders.allgather_json", lambda local: [local])
    write_tokens(tmp_path / "t", {"train": lambda: docs}, tokenizer, SEQ_LEN, log=lambda _: None)
    chunks = open_tokens(tmp_path / "t", "train", tokenizer, SEQ_LEN)
    one = _loaders(chunks, 2)
    halves = [_loaders(chunks, 2, p, 2) for p in range(2)]
    for _ in range(3):
        whole, parts = next(one), [next(h) for h in halves]
        for k in whole:  # each process holds its loader's rows of every micro-batch
            joined = np.concatenate([p[k].reshape(2, -1, SEQ_LEN) for p in parts], axis=1).reshape(-1, SEQ_LEN)
            np.testing.assert_array_equal(whole[k], joined)
    saved = json.loads(json.dumps(one.state()))
    expected = [next(one) for _ in range(3)]
    resumed = _loaders(open_tokens(tmp_path / "t", "train", tokenizer, SEQ_LEN), 2)
    resumed.restore(saved)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    second = _loaders(chunks, 2, 1, 2)  # resume on another process count: process 1 of 2
    second.restore(saved)
    np.testing.assert_array_equal(next(second)["inputs"].reshape(2, -1, SEQ_LEN),
                                  expected[0]["inputs"].reshape(2, -1, SEQ_LEN)[:, 2:])


def test_unigram_baseline_from_the_manifest_counts(docs, tokenizer, tmp_path):
    write_tokens(tmp_path / "t", {"train": lambda: docs[:300], "val": lambda: docs[300:]}, tokenizer, SEQ_LEN,
                 log=lambda _: None)
    train, val = (open_tokens(tmp_path / "t", s, tokenizer, SEQ_LEN) for s in ("train", "val"))
    token_bytes = tokenizer.token_bytes()
    want = unigram_bpb(list(train), list(val), token_bytes)
    assert unigram_bpb_from_counts(train.unigram, val.unigram, token_bytes) == pytest.approx(want, rel=1e-12)
    assert unigram_bpb_from_counts(val.unigram, val.unigram, token_bytes) < want  # fitted on itself: lower


def test_tokenize_cli_for_a_raw_source_and_its_errors(text_spec, tokenizer, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok")
    out = tmp_path / "shards"
    assert main(["data", "tokenize", "--source", text_spec, "--val", text_spec.replace("*", "part3"),
                 "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--seq-len", "16", "--workers", "1"]) == 0
    manifest = read_manifest(out)
    assert manifest["seq_len"] == 16 and set(manifest["splits"]) == {"train", "val"}
    assert 0 < manifest["splits"]["val"]["tokens"] < manifest["splits"]["train"]["tokens"]
    assert main(["data", "tokenize", "--prepared", str(tmp_path), "--seq-len", "16"]) == 2
    assert "not a `lmjax data prepare` directory" in capsys.readouterr().err
    assert main(["data", "tokenize", "--source", text_spec, "--seq-len", "16"]) == 2


def test_preference_pairs_through_token_shards(tokenizer, tmp_path, monkeypatch):
    """Pairs go through token shards like chat: the shards hold `pair_chunk` records (loss masks inside), the raw
    `pairs:` spec is cached with the same held-out split by prompt, DPO batches are the same from either, and a
    pair directory is refused where documents are expected."""
    monkeypatch.setenv("LMJAX_CACHE_DIR", str(tmp_path / "cache"))
    pairs = [{"prompt": [{"role": "user", "content": f"What is item {i}?"}],
              "chosen": f"Item {i} is a number.", "rejected": "No."} for i in range(60)]
    pairs.append({"prompt": [{"role": "user", "content": "x " * 80}], "chosen": "a", "rejected": "b"})  # too long
    source = tmp_path / "prefs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer.save(tmp_path / "tok")
    assert main(["data", "tokenize", "--source", f"pairs:{source}", "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "shards"), "--seq-len", "48", "--workers", "1"]) == 0
    train_pairs, heldout = split_heldout(pairs)
    for split, part in (("train", train_pairs), ("val", heldout)):
        chunks = open_pairs(f"{tmp_path / 'shards'}:{split}", tokenizer, 48)
        expected, dropped = pair_chunks(part, tokenizer, 48)
        assert chunks.masked and len(chunks) == len(expected) > 0 and chunks.dropped == dropped
        for got, want in zip(chunks, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert sum(open_pairs(str(tmp_path / "shards"), tokenizer, 48, part).dropped for part in ("train", "heldout")) == 1
    row = pair_row(open_pairs(str(tmp_path / "shards"), tokenizer, 48)[0], 48)
    assert tokenizer.decode(row["rejected_targets"][row["rejected_loss_mask"] == 1]) == "No."
    for part in ("train", "heldout"):
        raw, made = (open_pairs(spec, tokenizer, 48, part, log=lambda _: None)
                     for spec in (f"pairs:{source}", str(tmp_path / "shards")))
        _equal_batches(pair_batches(raw, 48, 2, seed=3, loader_index=1, loader_count=2),
                       pair_batches(made, 48, 2, seed=3, loader_index=1, loader_count=2), n=4)
        evals = [eval_pair_batches(c, 48, 4, 2) for c in (raw, made)]
        for a, b in zip(*evals, strict=True):
            _equal_batches(iter([a]), iter([b]), n=1)
    with pytest.raises(DataError, match="hold pairs, not documents or chat: train on them with train.objective=dpo"):
        open_chunks(str(tmp_path / "shards"), tokenizer, 48)
    with pytest.raises(DataError, match="reads preference pairs"):
        open_pairs("stdlib", tokenizer, 48)
