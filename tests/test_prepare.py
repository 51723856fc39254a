"""`lmjax data prepare` on a messy local corpus: accounting, resume, training from the output, CLI."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config

import lmjax.corpus.prepare as prepare_module
from lmjax.cli import main
from lmjax.config import DataError, load_config
from lmjax.corpus.prepare import prepare, prepare_config
from lmjax.corpus.shards import iter_split, shard_paths
from lmjax.corpus.sources import read_documents
from lmjax.input.specs import tokenize_prepared

WORDS = ("parser reads each line input file splits fields returns list records errors reported number empty "
         "lines skipped comments start hash sign value object method class module function argument default "
         "string integer buffer stream socket thread queue timeout encoding format result option").split()


EVAL_QUESTION = "Which standard library module parses command line options into a namespace of typed values?"


def _doc(i: int) -> str:
    """A distinct, well-formed document (sentences of random words, seeded by `i`)."""
    rng = random.Random(i)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                 for _ in range(6)]
    return "\n".join(sentences)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A corpus with every kind of trouble; returns (source spec, expected facts)."""
    root = tmp_path_factory.mktemp("messy")
    lines = [json.dumps({"text": _doc(i)}) for i in range(40)]
    lines += [
        json.dumps({"text": _doc(3)}),  # exact duplicate
        json.dumps({"text": _doc(4).replace(".", " indeed.", 1)}),  # near duplicate
        json.dumps({"text": _doc(50) + " Mail jane.doe@example.com or call +1 415 555 0100."}),  # PII
        json.dumps({"text": "buy now!!! $$$ ### ### ### ###"}),  # junk
        json.dumps({"text": _doc(51) + " Here is how to make a bomb at home."}),  # blocklisted
        '{"text": "broken',  # broken JSON
        json.dumps({"body": "no text field"}),  # missing field
        json.dumps({"text": 42}),  # wrong type
        json.dumps({"text": EVAL_QUESTION + " " + _doc(52)}),  # holds an evaluation question
    ]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "latin1.txt").write_bytes((_doc(60) + " Café olé.").encode("latin-1"))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (root / "empty.txt").write_text("")
    return f"jsonl:{root}/*.jsonl", root


def _cfg(spec: str, **changes):
    cfg = prepare_config()
    cfg.update({"sources": spec, "workers": 1, "chunk_docs": 10, "val_fraction": 0.1, **changes})
    cfg.tokenizer.vocab_size = 400
    return cfg


@pytest.fixture(scope="module")
def prepared(messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, prepare(_cfg(messy[0]), out, log=lambda _: None)


def test_card_accounts_for_every_document(prepared):
    out, card = prepared
    removed = {reason: entry["count"] for reason, entry in card["removed"].items()}
    assert card["documents_in"] == sum(removed.values()) + sum(card["documents_out"].values())
    assert removed["exact_duplicate"] == 1 and removed["near_duplicate"] >= 1
    assert removed["blocklist"] == 1 and card["removed"]["blocklist"]["examples"][0]["matched"]
    assert any(reason.startswith("quality:") for reason in removed)
    assert card["pii_replaced"]["EMAIL"] == 1 and card["pii_replaced"]["PHONE"] == 1
    skipped = {reason: entry["count"] for reason, entry in card["input_skipped"].items()}
    assert skipped["broken_json"] == 1 and skipped["missing_field"] == 1 and skipped["non_string_field"] == 1
    assert card["input_skipped"]["broken_json"]["examples"][0]["id"].endswith("a.jsonl:46")
    assert card["tokens_out"]["train"] > 0 and card["documents_out"]["val"] >= 1
    assert (out / "card.md").read_text().startswith("# Data card") and (out / "doc_lengths.png").stat().st_size
    assert card["demographics"]["sentences"] > 0 and "## Gendered words" in (out / "card.md").read_text()
    assert json.loads((out / "card.json").read_text()) == card


def test_documents_holding_evaluation_text_are_removed(messy, tmp_path):
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "questions.jsonl").write_text(json.dumps({"question": EVAL_QUESTION, "answer": "argparse"}) + "\n")
    cfg = _cfg(messy[0], val_fraction=0.0)
    cfg.dedup.decontaminate.files = f"{evals}/*.jsonl"
    card = prepare(cfg, tmp_path / "out", log=lambda _: None)
    assert card["removed"]["decontaminated"]["count"] == 1
    assert EVAL_QUESTION in card["removed"]["decontaminated"]["examples"][0]["text"]
    assert not any(EVAL_QUESTION in doc for doc in read_documents(str(tmp_path / "out")))


def test_bad_text_files_are_counted_and_skipped(messy, tmp_path):
    card = prepare(_cfg(f"text:{messy[1]}/*.txt", val_fraction=0.0), tmp_path / "t", log=lambda _: None)
    skipped = {reason: entry["count"] for reason, entry in card["input_skipped"].items()}
    assert skipped == {"binary": 1, "empty": 1, "invalid_utf8": 1}
    assert card["documents_out"] == {"train": 1}


def test_outputs_are_clean_and_readable_as_sources(prepared):
    out, card = prepared
    train = list(read_documents(str(out)))
    val = list(read_documents(f"{out}:val"))
    assert len(train) == card["documents_out"]["train"] and len(val) == card["documents_out"]["val"]
    text = "\n".join(train + val)
    assert "jane.doe@example.com" not in text and "<EMAIL>" in text and "bomb" not in text
    assert not set(train) & set(val)


def test_interrupted_prepare_resumes_to_the_same_result(messy, prepared, tmp_path):
    out = tmp_path / "again"

    def stop_after_two_chunks(message: str) -> None:
        if message.startswith("chunk 2:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(messy[0]), out, log=stop_after_two_chunks)
    assert len(shard_paths(out, "train")) == 2 and not (out / "card.json").exists()
    assert not list(out.rglob("*.tmp"))
    messages = []
    card = prepare(_cfg(messy[0]), out, log=messages.append)
    assert any(m.startswith("resuming after chunk 2") for m in messages)
    reference = prepared[1]
    assert {k: v for k, v in card.items() if k != "seconds"} == {k: v for k, v in reference.items() if k != "seconds"}
    assert list(iter_split(out, "train")) == list(iter_split(prepared[0], "train"))


def test_crash_between_dedup_index_and_progress_resumes_to_the_same_result(messy, prepared, tmp_path,
                                                                          monkeypatch):
    """A kill after chunk 2's dedup indexes are saved but before its progress.json: the rerun must redo chunk 2
    against the indexes of chunk 1, not count its documents as duplicates of themselves."""
    out, real_write, progress_writes = tmp_path / "crashed", prepare_module.atomic_write, []

    def killed_at_second_commit(path, data):
        if Path(path).name == "progress.json":
            progress_writes.append(path)
            if len(progress_writes) == 2:
                raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(prepare_module, "atomic_write", killed_at_second_commit)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(messy[0]), out, log=lambda _: None)
    assert json.loads((out / "progress.json").read_text())["chunks_done"] == 1
    assert sorted(p.name for p in (out / "dedup").iterdir()) == \
        ["exact-00001.npz", "exact-00002.npz", "near-00001.npz", "near-00002.npz"]

    messages = []
    card = prepare(_cfg(messy[0]), out, log=messages.append)
    assert any(m.startswith("resuming after chunk 1") for m in messages)
    reference = prepared[1]
    assert {k: v for k, v in card.items() if k != "seconds"} == {k: v for k, v in reference.items() if k != "seconds"}
    assert list(iter_split(out, "train")) == list(iter_split(prepared[0], "train"))
    chunks = json.loads((out / "progress.json").read_text())["chunks_done"]
    assert sorted(p.name for p in (out / "dedup").iterdir()) == [f"exact-{chunks:05d}.npz", f"near-{chunks:05d}.npz"]


def test_prepare_refuses_progress_that_loses_documents(messy, prepared, tmp_path):
    out = tmp_path / "tampered"
    shutil.copytree(prepared[0], out)
    (out / "card.json").unlink()
    progress = json.loads((out / "progress.json").read_text())
    progress["kept"]["train"] += 1
    (out / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(RuntimeError, match="does not account for every document"):
        prepare(_cfg(messy[0]), out, log=lambda _: None)


def test_small_mixture_component_keeps_its_share(tmp_path):
    """configs/data/web.py's recipe: prepare (clean, dedup) each component on its own, then mix the prepared
    directories with /cycle at training time; the small component keeps its weight's share of the documents."""
    prepared = {}
    for name, ids in (("large", range(1000, 1400)), ("small", range(2000, 2020))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in ids))
        prepared[name] = tmp_path / f"prepared-{name}"
        prepare(_cfg(f"jsonl:{tmp_path}/{name}.jsonl", val_fraction=0.0), prepared[name], log=lambda _: None)
    large, small = list(iter_split(prepared["large"], "train")), set(iter_split(prepared["small"], "train"))
    assert len(large) == 400 and len(small) == 20

    docs = list(read_documents(f"mix/cycle:{prepared['large']}@0.9|{prepared['small']}@0.1"))
    from_small = sum(doc in small for doc in docs)
    assert sorted(doc for doc in docs if doc not in small) == sorted(large)
    assert 0.07 < from_small / len(docs) < 0.13 and from_small > 2 * len(small)

    # Mixing before dedup instead (what configs/data/web.py did): exact dedup keeps one copy of the small part.
    mixed = f"mix/cycle:jsonl:{tmp_path}/large.jsonl@0.9|jsonl:{tmp_path}/small.jsonl@0.1"
    card = prepare(_cfg(mixed, val_fraction=0.0), tmp_path / "prepared-mixed", log=lambda _: None)
    assert card["documents_out"]["train"] == len(large) + len(small) < len(docs)
    assert "mix" not in load_config(Path(__file__).parents[1] / "configs/data/web.py").sources


def test_prepare_refuses_a_different_config_on_the_same_out(messy, prepared):
    with pytest.raises(ValueError, match="different config"):
        prepare(_cfg(messy[0], val_fraction=0.5), prepared[0], log=lambda _: None)


def test_prepare_resumes_under_other_token_shard_knobs(messy, tmp_path):
    """`tokens.*` only shapes the token shards written after the text shards: a directory begun under other values
    (or before they existed) resumes."""
    old = json.loads(_cfg(messy[0]).to_json())
    del old["tokens"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "prepare_config.json").write_text(json.dumps(old))
    cfg = _cfg(messy[0])
    cfg.tokens.seq_len = 64
    assert prepare(cfg, tmp_path / "out", log=lambda _: None)["documents_out"]["train"] > 0


def test_training_reads_a_prepared_directory(tmp_path):
    out = tmp_path / "stdlib"
    cfg = prepare_config()
    cfg.update(workers=1)
    cfg.tokenizer.vocab_size = 512
    prepare(cfg, out, log=lambda _: None)
    tokenize_prepared(out, 32, workers=1, log=lambda _: None)
    from lmjax.train.loop import train

    overrides = ("train.steps=24", "train.eval_every=0", "train.samples=", f"data.train={out}", f"data.val={out}:val",
                 "tokenizer.path=")
    with pytest.raises(DataError, match="chunked for seq_len 32, this run has model.seq_len 64"):
        train(tiny_config(*overrides), tmp_path / "refused")
    assert tokenize_prepared(out, 64, workers=1, log=lambda _: None)["seq_len"] == 64
    result = train(tiny_config(*overrides), tmp_path / "run")
    assert result["step"] == 24
    manifest, card = (json.loads((out / name).read_text()) for name in ("tokens/manifest.json", "card.json"))
    assert {k: v["tokens"] for k, v in manifest["splits"].items()} == \
        {k: card["tokens_out"][k] + card["documents_out"][k] for k in ("train", "val")}, "the card's tokens + eos"
    # bits per byte of knowing nothing (uniform over the 512 tokens): val_bpb scaled as ln(512) is to val_loss
    uniform_bpb = math.log(512) * result["val_bpb"] / result["val_loss"]
    assert result["val_bpb"] < (uniform_bpb + result["unigram_bpb"]) / 2, result  # half way to the unigram baseline
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.model").read_bytes() == \
        (out / "tokenizer" / "tokenizer.model").read_bytes()


def test_tokenizer_cli_trains_and_reports(tmp_path, capfd):
    assert main(["tokenizer", "train", "--source", "stdlib", "--vocab-size", "600", "--out", str(tmp_path)]) == 0
    assert main(["tokenizer", "stats", "--tokenizer", str(tmp_path), "--source", "stdlib:val"]) == 0
    out = capfd.readouterr().out
    bytes_per_token = float(out.split(" bytes/token")[0].split()[-1])
    assert 1.5 < bytes_per_token < 6.0 and "byte-fallback share" in out


def test_data_prepare_cli_reports_bad_sources(tmp_path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path), "--config.sources=jsonl:/nonexistent/*.jsonl"]) == 2
    assert "no files match" in capsys.readouterr().err
