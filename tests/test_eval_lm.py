"""`lmjax eval lm`: whole documents scored by sliding windows, sharing training validation's scoring code."""

import itertools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import cli
from lmjax.corpus.sources import read_documents
from lmjax.eval.lm import jit_eval_step, lm_metrics, run_unigram_bpb, score_sequences, windows
from lmjax.input.chunks import tokenize_documents
from lmjax.input.packing import eval_batches
from lmjax.model.loss import token_losses
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir

DOCS = ["Return the absolute value of the argument, which may be an integer or a float.",
        "Split the string at the first occurrence of sep, and return a 3-tuple.", "Open a file.",
        "Ünïcödé text costs more bytes than tokens: 東京."]


def scored_positions(sequence: np.ndarray, context: int, stride: int) -> list[tuple[int, int]]:
    """(target index in the sequence, tokens of left context it is predicted from) of every scored target."""
    out, start = [], 0
    for window in windows(sequence, context, stride):
        out += [(start + i + 1, i + 1) for i in np.flatnonzero(window["weights"])]
        start += stride
    return out


@pytest.mark.parametrize("n, context, stride", [(5, 8, 4), (9, 8, 8), (40, 8, 3), (41, 8, 1), (33, 8, 7)])
def test_windows_score_every_target_once_with_at_least_context_minus_stride_tokens(n, context, stride):
    sequence = np.arange(100, 100 + n, dtype=np.int32)
    positions = scored_positions(sequence, context, stride)
    assert [t for t, _ in positions] == list(range(1, n))
    assert all(left >= min(t, context - stride + 1) for t, left in positions)
    for window in windows(sequence, context, stride):
        assert len(window["inputs"]) <= context
        assert list(window["targets"]) == [x + 1 for x in window["inputs"]]  # targets follow their inputs


def test_stride_equal_to_the_context_is_trainings_cut_into_chunks(shared_tokenizer):
    (sequence,) = tokenize_documents([DOCS[0] * 3], shared_tokenizer, 10_000)
    chunks = tokenize_documents([DOCS[0] * 3], shared_tokenizer, 16)
    wins = windows(sequence, 16, 16)
    assert len(wins) == len(chunks) > 2
    for window, chunk in zip(wins, chunks, strict=True):
        assert list(window["inputs"]) == list(chunk[:-1]) and list(window["targets"]) == list(chunk[1:])
        assert window["weights"].all()


def test_chat_windows_count_only_the_assistants_tokens():
    tokens = np.arange(20, dtype=np.int32)
    mask = (np.arange(20) % 3 == 0).astype(np.int32)
    wins = windows(np.stack([tokens, mask]), 8, 4)
    scored = [int(t) for w in wins for t, weight in zip(w["targets"], w["weights"], strict=True) if weight]
    assert scored == [t for t in range(1, 20) if t % 3 == 0]


@pytest.fixture(scope="module")
def model(trained_run):
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(trained_run[0]))
    return cfg, graphdef, params, tokenizer


def row_losses(model, rows: list[list[int]], context: int) -> np.ndarray:
    """Per-token losses of token lists, each forwarded alone in a zero-padded row of `context` tokens."""
    _, graphdef, params, _ = model
    batch = {k: np.zeros((len(rows), context), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    for r, tokens in enumerate(rows):
        n = len(tokens) - 1
        batch["inputs"][r, :n], batch["targets"][r, :n] = tokens[:-1], tokens[1:]
        batch["segment_ids"][r, :n], batch["positions"][r, :n] = 1, np.arange(n)
    return np.asarray(token_losses(params, graphdef, batch))


def test_sliding_window_equals_a_naive_loop_over_tokens(model):
    _, graphdef, params, tokenizer = model
    context, stride = 8, 3
    (sequence,) = tokenize_documents([DOCS[1]], tokenizer, 10_000)
    assert len(sequence) > 3 * context
    # one forward per target t, on the left context the sliding window gives it: the window starting at the
    # first multiple of the stride whose context reaches t (all of 0..t while t <= context)
    starts = [0 if t <= context else -(-(t - context) // stride) * stride for t in range(1, len(sequence))]
    losses = row_losses(model, [list(sequence[s : t + 1]) for t, s in enumerate(starts, 1)], context)
    naive = sum(losses[r, t - s - 1] for r, (t, s) in enumerate(zip(range(1, len(sequence)), starts, strict=True)))
    out = score_sequences(params, graphdef, [sequence], tokenizer.token_bytes(), context, stride, batch_size=4)
    assert out["tokens"] == len(sequence) - 1
    assert out["loss"] * out["tokens"] == pytest.approx(naive, rel=1e-5)


def test_documents_shorter_than_the_context_equal_single_full_forwards(model):
    cfg, graphdef, params, tokenizer = model
    sequences = tokenize_documents(DOCS, tokenizer, 10_000)
    context = cfg.model.seq_len
    assert all(len(s) <= context for s in sequences)
    losses = row_losses(model, [list(s) for s in sequences], context)
    alone = sum(losses[r, : len(s) - 1].sum() for r, s in enumerate(sequences))
    out = score_sequences(params, graphdef, sequences, tokenizer.token_bytes(), context, context // 2, batch_size=2)
    assert out["windows"] == len(DOCS)  # packed side by side into rows, yet each scored on its own
    assert out["loss"] * out["tokens"] == pytest.approx(float(alone), rel=1e-5)


def test_bits_per_byte_counts_the_documents_utf8_bytes(model):
    cfg, graphdef, params, tokenizer = model
    sequences = tokenize_documents(DOCS, tokenizer, 10_000)
    out = score_sequences(params, graphdef, sequences, tokenizer.token_bytes(), 8, 4, batch_size=4)
    assert out["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert out["bpb"] == pytest.approx(out["loss"] * out["tokens"] / math.log(2) / out["bytes"])


def test_non_overlapping_windows_equal_trainings_packed_validation(model):
    cfg, graphdef, params, tokenizer = model
    context = cfg.model.seq_len
    docs = list(itertools.islice(read_documents(cfg.data.val), 24))
    sequences, chunks = (tokenize_documents(docs, tokenizer, n) for n in (10_000, context))
    token_bytes = tokenizer.token_bytes()
    val = lm_metrics(jit_eval_step(graphdef), params, eval_batches(chunks, context, 4, 1000),
                     jnp.asarray(token_bytes, jnp.float32))
    out = score_sequences(params, graphdef, sequences, token_bytes, context, context, batch_size=4)
    assert out["loss"] == pytest.approx(val["val_loss"], rel=1e-5)
    assert out["bpb"] == pytest.approx(val["val_bpb"], rel=1e-5)


def test_eval_lm_command_on_the_trained_run(trained_run, tmp_path, capsys):
    out = tmp_path / "lm.json"
    assert cli.main(["eval", "lm", "--workdir", str(trained_run[0]), "--source", "stdlib:val", "--max-docs", "40",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["documents"] == 40 and result["stride"] == 32 and result["windows"] >= 40
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("loss", "ppl", "bpb", "unigram_bpb"))
    assert result["ppl"] == pytest.approx(math.exp(result["loss"])) and "data.train stdlib" in result["unigram_note"]
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "unigram" in printed and f"{result['bpb']:.4f}" in printed


def test_unigram_baseline_is_said_unavailable_when_the_runs_training_data_cannot_be_read(model):
    cfg, _, _, tokenizer = model
    cfg = cfg.copy_and_resolve_references()
    cfg.data.train = "jsonl:/nonexistent/*.jsonl"
    baseline, note = run_unigram_bpb(cfg, tokenizer, tokenize_documents(DOCS, tokenizer, 10_000))
    assert baseline is None and note.startswith("unavailable") and "/nonexistent" in note


@pytest.mark.parametrize("args, message", [
    (["--source", "jsonl:/nonexistent/*.jsonl"], "no file"),
    (["--source", "pairs:x.jsonl"], "preference pairs"),
    (["--source", "stdlib:val", "--stride", "0"], "--stride 0"),
    (["--source", "stdlib:val", "--stride", "65"], "--stride 65"),
])
def test_bad_sources_and_strides_are_one_line_errors(trained_run, capsys, args, message):
    assert cli.main(["eval", "lm", "--workdir", str(trained_run[0]), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax: error:") and message in err, err
