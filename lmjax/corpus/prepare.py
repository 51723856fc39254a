"""`lmjax data prepare`: raw sources -> cleaned, deduplicated, split ArrayRecord shards + a data card.

The input is processed in chunks of `chunk_docs` documents. Each chunk is cleaned in parallel
(normalise, quality rules, blocklist, PII), deduplicated in order (exact, then near-duplicate against
everything kept before), split into train/val by a hash of its text, and written as one train and one
val shard (temporary file, then rename). After each chunk the dedup indexes are saved under the chunk's
number, then progress.json (the counts, and so which indexes are current) replaces the old one: that
rename is the one commit point, so an interrupted run continues from the last committed chunk with the
indexes of exactly that chunk, and never leaves a partial shard that training would read. At the end a
tokenizer is trained on the train shards, tokens are counted, and the data card (card.json, card.md,
doc_lengths.png) accounts for every input document.

    DIR/train/train-00000.arrayrecord ...   one cleaned document per record (UTF-8)
    DIR/val/val-00000.arrayrecord ...
    DIR/tokenizer/tokenizer.model
    DIR/tokens/                             token shards for tokens.seq_len (written by the CLI after `prepare`)
    DIR/card.json, DIR/card.md, DIR/doc_lengths.png
    DIR/progress.json, DIR/dedup/{exact,near}-NNNNN.npz   resume state (indexes after NNNNN chunks)
"""

import collections
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from lmjax.config import ConfigError, DataError
from lmjax.corpus.clean import clean_config, normalize, quality_issue
from lmjax.corpus.dedup import Decontaminator, ExactDedup, NearDedup, dedup_config
from lmjax.corpus.demographics import cooccurrence, render_cooccurrence
from lmjax.corpus.pii import scrub_pii
from lmjax.corpus.shards import SPLITS, iter_split, shard_paths, write_shard
from lmjax.corpus.sources import iter_records, source_license
from lmjax.text.blocklist import Blocklist
from lmjax.text.io import atomic_write, hash_unit
from lmjax.text.tokenizer import Tokenizer, describe_size, train_tokenizer

LENGTH_BINS = np.unique(np.geomspace(1, 1e6, 61).astype(int))  # words per document, log-spaced


def prepare_config() -> ConfigDict:
    """Every knob of `lmjax data prepare`, with its default."""
    c = ConfigDict()
    c.sources = "stdlib:all"  # source spec (see lmjax/data/sources.py), mixtures included
    c.license = ""  # the sources' license as their owners grant it, for data and model cards; "" = see source_license
    c.val_fraction = 0.05  # share of kept documents held out for validation (by text hash)
    c.chunk_docs = 20000  # input documents per chunk: one train + one val shard, and one resume point
    c.batch_docs = 500  # documents per task handed to a cleaning worker
    c.workers = 2  # cleaning processes (1 = in this process)
    c.examples = 3  # examples kept in the card per removal reason
    c.pii = True  # replace e-mails, phones, IPs and card numbers with typed placeholders
    c.clean = clean_config()
    c.dedup = dedup_config()
    c.tokenizer = ConfigDict()
    c.tokenizer.kind = "bpe"  # SentencePiece model type trained on the train split: bpe | unigram | char
    c.tokenizer.vocab_size = 4096  # its vocabulary size (bpe, unigram; char has one token per character seen)
    c.tokens = ConfigDict()  # token shards in DIR/tokens (what training reads; `lmjax data prepare` CLI only)
    c.tokens.seq_len = 256  # model.seq_len of the runs that read them; 0 = write none (`lmjax data tokenize` later)
    c.tokens.workers = 2  # tokenizing processes
    return c


_worker: dict = {}


def _init_worker(clean_cfg: dict, pii: bool) -> None:
    cfg = ConfigDict(clean_cfg)
    _worker.update(cfg=cfg, pii=pii, blocklist=Blocklist.from_config(cfg.blocklist) if cfg.blocklist.enabled else None)


def _clean_batch(texts: list[str]) -> list[tuple[str, str | None, dict]]:
    """(cleaned text, removal reason or None, PII counts) per document; runs in a worker."""
    cfg, out = _worker["cfg"], []
    for text in texts:
        text = normalize(text, cfg)
        reason, pii = None, {}
        if not text.strip():
            reason = "empty_after_normalize"
        elif cfg.quality.enabled and (issue := quality_issue(text, cfg)):
            reason = f"quality:{issue}"
        elif _worker["blocklist"] is not None and (term := _worker["blocklist"].match(text)):
            reason = f"blocklist:{term}"
        elif _worker["pii"]:
            text, counts = scrub_pii(text)
            pii = dict(counts)
        out.append((text, reason, pii))
    return out


class _Progress:
    """Counts and examples for the card; saved with each finished chunk."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.chunks_done = state.get("chunks_done", 0)
        self.consumed = state.get("consumed", 0)
        self.bytes_in = state.get("bytes_in", 0)
        self.seconds = state.get("seconds", 0.0)
        self.sources = collections.Counter(state.get("sources", {}))
        self.input_issues = collections.Counter(state.get("input_issues", {}))
        self.removed = collections.Counter(state.get("removed", {}))
        self.examples: dict[str, list] = state.get("examples", {})
        self.pii = collections.Counter(state.get("pii", {}))
        self.kept = collections.Counter(state.get("kept", {}))
        self.bytes_out = collections.Counter(state.get("bytes_out", {}))
        self.lengths = np.asarray(state.get("lengths", np.zeros(len(LENGTH_BINS), int)), np.int64)

    def skipped_input(self, reason: str, ident: str, keep_examples: int) -> None:
        """An example of input skipped while reading (the counts come from the source's stats)."""
        examples = self.examples.setdefault(f"input:{reason}", [])
        if len(examples) < keep_examples and {"id": ident} not in examples:
            examples.append({"id": ident})

    def remove(self, reason: str, ident: str, text: str, keep_examples: int) -> None:
        group = reason.split(":")[0] if reason.startswith("blocklist:") else reason
        self.removed[group] += 1
        examples = self.examples.setdefault(group, [])
        if len(examples) < keep_examples:
            examples.append({"id": ident, "text": text[:300]} if group != "blocklist" else
                            {"id": ident, "matched": reason.split(":", 1)[1]})

    def state(self) -> dict:
        return {"chunks_done": self.chunks_done, "consumed": self.consumed, "bytes_in": self.bytes_in,
                "seconds": self.seconds, "sources": self.sources, "input_issues": self.input_issues,
                "removed": self.removed, "examples": self.examples, "pii": self.pii, "kept": self.kept,
                "bytes_out": self.bytes_out, "lengths": self.lengths.tolist()}


def _index_path(dedup_dir: Path, name: str, chunks_done: int) -> Path:
    """The saved dedup index `name` ("exact" or "near") as it is after `chunks_done` chunks."""
    return dedup_dir / f"{name}-{chunks_done:05d}.npz"


def _load_index(cls: type[ExactDedup] | type[NearDedup], dedup_dir: Path, name: str,
                chunks_done: int) -> ExactDedup | NearDedup:
    path = _index_path(dedup_dir, name, chunks_done)
    if not path.is_file():
        raise DataError(f"progress.json says {chunks_done} chunks are done but {path} is missing; use a new --out")
    return cls.load(path)


def _commit(out: Path, progress: _Progress, exact: ExactDedup | None, near: NearDedup | None) -> None:
    """Saves the state after a chunk. The indexes go to files named by the chunk count, then the atomic
    replacement of progress.json (which holds the count) makes them current; a crash before it resumes
    with the previous progress.json and the previous indexes, which are removed only after it."""
    dedup_dir = out / "dedup"
    dedup_dir.mkdir(exist_ok=True)
    current = set()
    for name, index in (("exact", exact), ("near", near)):
        if index is not None:
            path = _index_path(dedup_dir, name, progress.chunks_done)
            index.save(path)
            current.add(path)
    atomic_write(out / "progress.json", json.dumps(progress.state()))
    for path in set(dedup_dir.glob("*.npz")) - current:
        path.unlink()


def _shard_config(config: dict) -> dict:
    """The knobs that decide what the text shards hold: all but `tokens` (the token shards are written after,
    and are refused or remade on their own by their manifest), so a prepare may resume under other `tokens.*`
    values or from before they existed."""
    return {k: v for k, v in config.items() if k != "tokens"}


def prepare(cfg: ConfigDict, out: str | Path, log=print) -> dict:
    """Runs (or resumes) the whole preparation into `out`; returns the card."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "prepare_config.json"
    if config_path.exists() and _shard_config(json.loads(config_path.read_text())) != _shard_config(
            json.loads(cfg.to_json())):
        raise ConfigError(f"{out} was prepared with a different config ({config_path}); use a new --out")
    atomic_write(config_path, cfg.to_json(indent=2))
    progress_path, dedup_dir = out / "progress.json", out / "dedup"
    progress = _Progress(json.loads(progress_path.read_text()) if progress_path.exists() else None)
    d = cfg.dedup
    resuming = progress.chunks_done > 0
    exact = (_load_index(ExactDedup, dedup_dir, "exact", progress.chunks_done) if resuming else ExactDedup()) \
        if d.exact else None
    near = (_load_index(NearDedup, dedup_dir, "near", progress.chunks_done) if resuming else
            NearDedup.from_config(d)) if d.near else None
    if resuming:
        log(f"resuming after chunk {progress.chunks_done} ({progress.consumed:,} documents done)")
    decontaminator = Decontaminator.from_globs(d.decontaminate.files, d.decontaminate.ngram) \
        if d.decontaminate.files else None

    issues: collections.Counter = collections.Counter()
    records = iter_records(cfg.sources, issues,
                           on_bad_input=lambda reason, ident: progress.skipped_input(reason, ident, cfg.examples))
    skipped = sum(1 for _ in itertools.islice(records, progress.consumed))
    if skipped < progress.consumed:
        raise DataError(f"{cfg.sources} now yields {skipped} documents, fewer than the {progress.consumed} "
                        "already prepared: the input changed; use a new --out")
    issues.clear()
    issues.update(progress.input_issues)

    start = time.time()
    context = multiprocessing.get_context("spawn")
    init_args = (cfg.clean.to_dict(), cfg.pii)
    pool = context.Pool(cfg.workers, _init_worker, init_args) if cfg.workers > 1 else None
    if pool is None:
        _init_worker(*init_args)
    try:
        while chunk := list(itertools.islice(records, cfg.chunk_docs)):
            batches = [[r.text for r in chunk[i:i + cfg.batch_docs]] for i in range(0, len(chunk), cfg.batch_docs)]
            cleaned = list(itertools.chain.from_iterable(
                pool.map(_clean_batch, batches) if pool else map(_clean_batch, batches)))
            _dedup_and_write(cfg, out, chunk, cleaned, progress, exact, near, decontaminator)
            progress.consumed += len(chunk)
            progress.input_issues = collections.Counter(issues)
            progress.seconds += time.time() - start
            start = time.time()
            _commit(out, progress, exact, near)
            log(f"chunk {progress.chunks_done}: {progress.consumed:,} documents in, "
                f"{sum(progress.kept.values()):,} kept, {progress.consumed / max(progress.seconds, 1e-9):,.0f} docs/s")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return _finish(cfg, out, progress, log)


def _dedup_and_write(cfg, out, chunk, cleaned, progress, exact, near, decontaminator) -> None:
    """Dedup in input order (exact, then decontamination over the chunk at once, then near-duplicates), split
    and write this chunk's shards; updates `progress`."""
    candidates = []
    for record, (text, reason, pii) in zip(chunk, cleaned, strict=True):
        progress.sources[record.source] += 1
        progress.bytes_in += len(record.text.encode("utf-8"))
        if reason is None and exact is not None and exact.is_duplicate(text):
            reason = "exact_duplicate"
        if reason is not None:
            progress.remove(reason, record.ident, record.text, cfg.examples)
            continue
        candidates.append((record, text, pii))
    texts = [text for _, text, _ in candidates]
    clean = decontaminator.filter_batch(texts) if decontaminator is not None else [True] * len(texts)
    survivors = []
    for (record, text, pii), ok in zip(candidates, clean, strict=True):
        if not ok:
            progress.remove("decontaminated", record.ident, record.text, cfg.examples)
            continue
        progress.pii.update(pii)
        survivors.append((record, text))
    keep = near.filter_batch([t for _, t in survivors]) if near is not None else [True] * len(survivors)
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    for (record, text), kept in zip(survivors, keep, strict=True):
        if not kept:
            progress.remove("near_duplicate", record.ident, record.text, cfg.examples)
            continue
        split = "val" if hash_unit(text) < cfg.val_fraction else "train"
        shards[split].append(text)
        progress.kept[split] += 1
        progress.bytes_out[split] += len(text.encode("utf-8"))
        progress.lengths[min(np.searchsorted(LENGTH_BINS, len(text.split())), len(LENGTH_BINS) - 1)] += 1
    for split, texts in shards.items():
        if texts:
            write_shard(out / split / f"{split}-{progress.chunks_done:05d}.arrayrecord", texts)
    progress.chunks_done += 1


def _finish(cfg: ConfigDict, out: Path, progress: _Progress, log) -> dict:
    """Trains the tokenizer, counts tokens, writes the card."""
    removed, kept = sum(progress.removed.values()), sum(progress.kept.values())
    if progress.consumed != removed + kept:
        raise RuntimeError(f"{out / 'progress.json'} does not account for every document: {progress.consumed} "
                           f"read, {removed} removed, {kept} kept")
    if not progress.kept["train"]:
        raise DataError(f"no training documents survived cleaning of {cfg.sources}; see the counts in "
                        f"{out / 'progress.json'}")
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.model").is_file():
        start = time.time()
        tmp = out / "tokenizer.tmp"
        k_cfg = cfg.tokenizer
        trained = train_tokenizer(iter_split(out, "train"), k_cfg.vocab_size, tmp, kind=k_cfg.kind)
        os.replace(tmp, tokenizer_dir)
        log(f"trained a {k_cfg.kind} tokenizer ({describe_size(trained, k_cfg.kind, k_cfg.vocab_size)}) "
            f"in {time.time() - start:.1f}s")
    tokenizer = Tokenizer.load(tokenizer_dir)
    tokens = {split: _count_tokens(tokenizer, iter_split(out, split)) for split in SPLITS}
    card = {
        "sources": cfg.sources,
        "license": source_license(cfg.sources, cfg.license),
        "documents_in": progress.consumed,
        "bytes_in": progress.bytes_in,
        "documents_by_source": dict(progress.sources),
        "input_skipped": {reason: {"count": n, "examples": progress.examples.get(f"input:{reason}", [])}
                          for reason, n in sorted(progress.input_issues.items())},
        "removed": {reason: {"count": n, "examples": progress.examples.get(reason, [])}
                    for reason, n in sorted(progress.removed.items())},
        "documents_removed": removed,
        "duplicates": {"exact": progress.removed["exact_duplicate"], "near": progress.removed["near_duplicate"]},
        "pii_replaced": dict(progress.pii),
        "documents_out": dict(progress.kept),
        "bytes_out": dict(progress.bytes_out),
        "tokens_out": tokens,
        "tokenizer": {"kind": cfg.tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "shards": {split: len(shard_paths(out, split)) for split in SPLITS},
        "demographics": cooccurrence(iter_split(out, "train")),
        "seconds": round(progress.seconds, 1),
    }
    _plot_lengths(progress.lengths, out / "doc_lengths.png")
    atomic_write(out / "card.md", render_card(card))
    atomic_write(out / "card.json", json.dumps(card, indent=2))
    return card


def _count_tokens(tokenizer: Tokenizer, texts: Iterator[str], batch: int = 1000) -> int:
    total = 0
    while docs := list(itertools.islice(texts, batch)):
        total += sum(map(len, tokenizer.encode_batch(docs)))
    return total


def _plot_lengths(counts: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    edges = np.append(LENGTH_BINS, LENGTH_BINS[-1] * 1.2)
    ax.stairs(counts, edges, fill=True)
    ax.set_xscale("log")
    ax.set_xlabel("words per kept document")
    ax.set_ylabel("documents")
    ax.set_title("document lengths")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_card(card: dict) -> str:
    """The data card as Markdown."""
    lines = [f"# Data card: `{card['sources']}`", "", f"- license: {card['license']}",
             f"- documents in: {card['documents_in']:,} ({card['bytes_in']:,} bytes)",
             "- documents out: " + ", ".join(f"{k} {v:,}" for k, v in card["documents_out"].items()),
             "- tokens out: " + ", ".join(f"{k} {v:,}" for k, v in card["tokens_out"].items()),
             f"- duplicates removed: exact {card['duplicates']['exact']:,}, near {card['duplicates']['near']:,}",
             "- PII replaced: " + (", ".join(f"{k} {v:,}" for k, v in card["pii_replaced"].items()) or "none"),
             f"- time: {card['seconds']} s", "", "## Inputs skipped before cleaning", ""]
    lines += [f"- {k}: {v['count']:,} (e.g. " + ", ".join(f"`{e['id']}`" for e in v["examples"]) + ")"
              for k, v in card["input_skipped"].items()] or ["- none"]
    lines += ["", "## Documents removed", "", "| reason | documents | examples |", "|---|---|---|"]
    for reason, entry in card["removed"].items():
        examples = "<br>".join(
            f"`{e['id']}`: " + (f"matched “{e['matched']}”" if "matched" in e else
                                e["text"][:120].replace("\n", " ").replace("|", "\\|"))
            for e in entry["examples"])
        lines.append(f"| {reason} | {entry['count']:,} | {examples} |")
    lines += ["", *render_cooccurrence(card["demographics"]), "", "![document lengths](doc_lengths.png)", ""]
    return "\n".join(lines)
