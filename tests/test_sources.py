"""Tests for lmjax.corpus.sources: bad-input accounting, Parquet, TFDS, mixtures, stable idents."""

import json
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from lmjax.config import DataError
from lmjax.corpus import readers, sources
from lmjax.corpus.readers import SKIP_REASONS, Document
from lmjax.corpus.sources import iter_records, read_documents


def records(spec: str) -> tuple[list[Document], Counter]:
    stats: Counter = Counter()
    docs = list(iter_records(spec, stats))
    assert set(stats) <= set(SKIP_REASONS)
    return docs, stats


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


# --- text and JSONL: every bad input counted -------------------------------------------------


def test_text_bad_inputs(tmp_path):
    (tmp_path / "good.txt").write_text("plain text\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    docs, stats = records(f"text:{tmp_path}/*.txt")
    assert [(d.text, Path(d.ident).name) for d in docs] == [
        ("plain text\n", "good.txt"),
        ("caf\ufffd au lait", "latin1.txt"),
    ]
    assert stats == Counter(empty=2, binary=1, invalid_utf8=1, unreadable_file=1)
    assert all(d.source == f"text:{tmp_path}/*.txt" for d in docs)


def test_jsonl_bad_inputs(tmp_path):
    lines = [
        b'{"text": "good one", "id": 1}',
        b'{"text": "broken',
        b"\x00\x01\x02binary\xff junk\x03\x04",
        b'{"body": "no text field"}',
        b'{"text": null}',
        b'"just a string"',
        b'{"text": 42}',
        b'{"text": ["a", "list"]}',
        b'{"text": "  "}',
        b"",
        b'{"text": "bad \xff\xfe bytes"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "pair \\ud83d\\ude00 is fine"}',
        b'{"text": "last"}',
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(b"")
    (tmp_path / "c.jsonl").write_bytes(bytes(range(256)) * 4)
    docs, stats = records(f"jsonl:{tmp_path}/*.jsonl")
    assert [d.text for d in docs] == [
        "good one",
        "bad \ufffd\ufffd bytes",
        "lone ? surrogate",
        "pair 😀 is fine",
        "last",
    ]
    assert [d.ident.rpartition(":")[2] for d in docs] == ["1", "11", "12", "13", "14"]
    assert all(d.text.encode() for d in docs), "every text is valid UTF-8"
    assert stats == Counter(broken_json=1, binary=2, missing_field=3, non_string_field=2, empty=2, invalid_utf8=2), (
        "c.jsonl is binary, b.jsonl is empty"
    )


def test_jsonl_field_missing_from_whole_file_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["fine"])
    (tmp_path / "b.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="b.jsonl.*'text'"):
        list(iter_records(f"jsonl:{tmp_path}/*.jsonl"))
    assert [d.text for d in iter_records(f"jsonl:{tmp_path}/b.jsonl:content")] == ["x"]


def test_gigantic_lines_are_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "giant.jsonl"
    giant = 30 * readers.MAX_LINE_CHARS
    with open(path, "w") as f:
        f.write('{"text": "before"}\n{"text": "' + "x" * giant + '"}\n')
        f.write('{"text": "' + "y" * (readers.MAX_LINE_CHARS + 10) + '"}\n{"text": "after"}\n')
    tracemalloc.start()
    docs, stats = records(f"jsonl:{path}")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(d.text, d.ident) for d in docs] == [("before", f"{path}:1"), ("after", f"{path}:4")]
    assert stats == Counter(line_too_long=2)
    assert peak < 10 * readers.MAX_LINE_CHARS, f"peak {peak / 1e6:.0f} MB: the giant line must not be held whole"


def test_big_text_file_is_split_at_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_DOC_BYTES", 100)
    monkeypatch.setattr(readers, "MAX_LINE_CHARS", 60)
    lines = [f"line {i} " + "w" * (i % 7) * 5 + "\n" for i in range(40)]
    lines[10] = "z" * 70 + "\n"
    path = tmp_path / "big.txt"
    path.write_text("".join(lines))
    (tmp_path / "small.txt").write_text("short")
    docs, stats = records(f"text:{tmp_path}/*.txt")
    assert stats == Counter(line_too_long=1)
    assert docs[-1] == Document("short", f"text:{tmp_path}/*.txt", str(tmp_path / "small.txt"))
    parts = docs[:-1]
    assert len(parts) > 5 and all(len(d.text) <= 100 for d in parts)
    assert "".join(d.text for d in parts) == "".join(lines[:10] + lines[11:])
    for d in parts:
        first = int(d.ident.rpartition(":")[2])
        assert d.text.startswith(lines[first - 1]), "ident names the part's first line"


def test_stable_idents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [f"doc {i}" for i in range(50)])
    (tmp_path / "a.jsonl").open("a").write('{"broken\n{"text": "doc 50"}\n')
    spec = f"jsonl:{tmp_path}/*.jsonl"
    first, again = list(iter_records(spec)), list(iter_records(spec))
    assert first == again and len({d.ident for d in first}) == 51
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    for d in first:
        path, _, lineno = d.ident.rpartition(":")
        assert path == str(tmp_path / "a.jsonl") and json.loads(lines[int(lineno) - 1])["text"] == d.text


def test_read_documents_caps_warnings(tmp_path):
    (tmp_path / "a.jsonl").write_text("{broken\n" * 30 + '{"text": "ok"}\n')
    with pytest.warns(UserWarning) as record:
        assert list(read_documents(f"jsonl:{tmp_path}/a.jsonl")) == ["ok"]
    messages = [str(w.message) for w in record]
    assert len(messages) == sources.MAX_WARNINGS + 1
    assert "10 more bad inputs" in messages[-1] and "broken_json=30" in messages[-1]


# --- Parquet ---------------------------------------------------------------------------------


def test_parquet_source(tmp_path):
    table = pa.table({"id": list(range(6)), "text": ["one", None, "", "four", "five", "six"]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    body = pa.array([b"bytes \xff", b"ok"], type=pa.binary())
    pq.write_table(pa.table({"text": ["x", "y"], "body": body}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), tmp_path / "c.parquet")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    docs, stats = records(f"parquet:{tmp_path}/*.parquet")
    assert [d.text for d in docs] == ["one", "four", "five", "six", "x", "y"]
    assert [d.ident for d in docs[:4]] == [f"{tmp_path / 'a.parquet'}:{i}" for i in (0, 3, 4, 5)]
    assert stats == Counter(missing_field=1, empty=2, unreadable_file=1), "c.parquet is empty, d is corrupt"
    docs, stats = records(f"parquet:{tmp_path}/b.parquet:body")
    assert [d.text for d in docs] == ["bytes \ufffd", "ok"] and stats == Counter(invalid_utf8=1)


def test_parquet_bad_column(tmp_path):
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet.*'text'"):
        list(iter_records(f"parquet:{tmp_path}/a.parquet"))
    with pytest.raises(DataError, match=r"a\.parquet.*'n'.*int64"):
        list(iter_records(f"parquet:{tmp_path}/a.parquet:n"))


def test_parquet_streams_by_batches(tmp_path):
    texts = [f"row {i} " + "t" * 1000 for i in range(20_000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=1000)
    docs = iter_records(f"parquet:{tmp_path}/a.parquet")
    tracemalloc.start()
    n = sum(1 for _ in docs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 20_000
    assert peak < 5e6, f"Python-side peak {peak / 1e6:.1f} MB for a 20 MB column"


# --- TFDS ------------------------------------------------------------------------------------


class LmjaxToyText(tfds.core.GeneratorBasedBuilder):
    """A tiny local dataset: a Text feature, a plain string Tensor and an int."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="small"), tfds.core.BuilderConfig(name="large")]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"id": np.int64, "body": tfds.features.Text(), "raw": tfds.features.Tensor(shape=(), dtype=np.str_)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        n = 10 if self.builder_config.name == "small" else 30
        return {"train": self._generate_examples(n), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"id": i, "body": "" if i == 3 else f"body {i} ünï", "raw": f"raw {i}"}


@pytest.fixture(scope="module")
def toy_data_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    for config in ("small", "large"):
        LmjaxToyText(config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_local_builder(toy_data_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(toy_data_dir))
    docs, stats = records("tfds:lmjax_toy_text/small")
    assert sorted(d.text for d in docs) == sorted(f"body {i} ünï" for i in range(10) if i != 3)
    assert stats == Counter(empty=1)
    indices = [int(d.ident.removeprefix("tfds:lmjax_toy_text/small/train:")) for d in docs]
    assert len(indices) == 9 and indices == sorted(indices) and set(indices) < set(range(10))
    assert docs == list(iter_records("tfds:lmjax_toy_text/small")), "stable order and idents"
    raw = [d.text for d in iter_records("tfds:lmjax_toy_text/large:test:raw")]
    assert sorted(raw) == [f"raw {i}" for i in range(4)]
    assert len(list(iter_records("tfds:lmjax_toy_text/large:train[:20%]"))) == 6


def test_tfds_spec_errors(toy_data_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(toy_data_dir))
    for spec, why in [
        ("tfds:lmjax_toy_text/small:train:id", "not a text feature"),
        ("tfds:lmjax_toy_text/small:train:nope", "not a text feature"),
        ("tfds:no_such_dataset_xyz", "TFDS cannot open"),
        ("tfds:bad name!", "expected tfds:NAME"),
    ]:
        with pytest.raises(DataError, match=why):
            iter_records(spec)


def test_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        docs, stats = records("tfds:imdb_reviews")
        assert len(docs) + stats["empty"] == 7
        assert all(d.ident.startswith("tfds:imdb_reviews/train:") for d in docs)
        ds = tfds.data_source("ag_news_subset", split="test")
        first = next(k for k, f in ds.dataset_info.features.items() if isinstance(f, tfds.features.Text))
        docs, _ = records("tfds:ag_news_subset:test")  # no "text" feature: the first text feature
        assert [d.text for d in docs] == [ex[first] for ex in ds if ex[first].strip()]
        assert docs[0].ident.startswith("tfds:ag_news_subset/test:")
        other = "title" if first == "description" else "description"
        assert [d.text for d in records(f"tfds:ag_news_subset:test:{other}")[0]] == [
            ex[other] for ex in ds if ex[other].strip()
        ]


# --- mixtures --------------------------------------------------------------------------------


@pytest.fixture
def three_sources(tmp_path) -> list[str]:
    specs = []
    for name, n in (("a", 4000), ("b", 4000), ("c", 4000)):
        write_jsonl(tmp_path / f"{name}.jsonl", [f"{name} {i}" for i in range(n)])
        specs.append(f"jsonl:{tmp_path}/{name}.jsonl")
    return specs


def test_mixture_weights(three_sources):
    a, b, c = three_sources
    spec = f"mix:{a}@1|{b}@3|{c}@6"
    docs = list(iter_records(spec))
    counts = Counter(d.text[0] for d in docs)
    assert counts["c"] == 4000 or counts["c"] == 3999, "stops when the most drawn component runs out"
    share = {k: v / len(docs) for k, v in counts.items()}
    assert share == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6}, abs=0.02)
    assert {d.source for d in docs} == {a, b, c}
    assert [d.text for d in docs if d.text[0] == "b"] == [f"b {i}" for i in range(counts["b"])], "order kept"
    assert docs == list(iter_records(spec)), "seeded"
    assert docs != list(iter_records(f"mix/seed=1:{a}@1|{b}@3|{c}@6"))
    equal = Counter(d.text[0] for d in iter_records(f"mix:{a}|{b}"))  # weights default to 1
    assert abs(equal["a"] - equal["b"]) / equal.total() < 0.05


def test_mixture_cycle(tmp_path, three_sources):
    a, b, _ = three_sources
    write_jsonl(tmp_path / "tiny.jsonl", ["tiny 0", "tiny 1"])
    (tmp_path / "junk.jsonl").write_text("{broken\n")
    stats: Counter = Counter()
    docs = list(iter_records(f"mix/cycle:jsonl:{tmp_path}/tiny.jsonl@1|{a}@1|jsonl:{tmp_path}/junk.jsonl", stats))
    counts = Counter(d.text.split()[0] for d in docs)
    assert counts["a"] == 4000, "ends once every component ran out at least once"
    assert counts["tiny"] == pytest.approx(4000, rel=0.1), "small components restart"
    assert stats["broken_json"] >= 2, "an unusable component is dropped after a restart"
    first = list(iter_records(f"mix:jsonl:{tmp_path}/tiny.jsonl|{a}"))
    assert len(first) < 20, "by default the mixture ends when a component runs out"


@pytest.mark.parametrize(
    "spec, why",
    [
        ("mix:", "unknown source"),
        ("mix/shuffle:stdlib", "unknown mixture option"),
        ("mix:stdlib@0", "positive"),
        ("mix:stdlib@-2|stdlib:val", "positive"),
        ("mix:stdlib@nan", "positive"),
        ("mix:stdlib||stdlib:val", "empty mixture component"),
        ("mix:mix:stdlib", "do not nest"),
        ("mix:text:/no/such/*.txt@2", "no files match"),
        ("parquet:", "unknown source"),
        ("tfds:", "unknown source"),
    ],
)
def test_bad_specs(spec, why):
    with pytest.raises(DataError, match=why) as err:
        iter_records(spec)
    assert "valid forms" in str(err.value)


def test_mixture_component_with_at_sign_in_path(tmp_path):
    folder = tmp_path / "user@host"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ["at"])
    assert [d.text for d in iter_records(f"mix:jsonl:{folder}/*.jsonl")] == ["at"]
    assert [d.text for d in iter_records(f"mix:jsonl:{folder}/*.jsonl@2.5")] == ["at"]
