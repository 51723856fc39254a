"""Deduplication and decontamination of training documents.

Documents arrive in batches and are judged in order with keep-first semantics: a document is
dropped only for matching an earlier *kept* document. Every index keeps a fixed number of bytes per
document (not per byte of text) and can be saved to and loaded from an `.npz` of numpy arrays, so an
interrupted run resumes with identical decisions.

- `ExactDedup`: a seen-set of 128-bit hashes of the lower-cased, whitespace-collapsed text.
- `NearDedup`: MinHash signatures of word-shingle sets, LSH banding to find candidate pairs, then the
  Jaccard similarity estimated from the full signatures to confirm each candidate.
- `Decontaminator`: flags documents that share a long word n-gram with evaluation texts.

Near-duplicates and n-grams are over words as `lmjax.corpus.minhash` defines them, so whitespace,
punctuation and markup do not matter.
"""

import glob
import hashlib
import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from lmjax.config import ConfigError, DataError
from lmjax.corpus.minhash import (
    CHUNK_DOCS,
    MASK32,
    BucketTable,
    band_keys,
    lsh_params,
    minhash_signatures,
    ngram_hashes,
    word_hashes,
)
from lmjax.text.io import atomic_output

KEY_BYTES = 16  # exact-duplicate key size: collisions are negligible even for billions of documents
CHUNK_PAIRS = 65536  # candidate pairs whose signatures are compared at once


def dedup_config() -> ConfigDict:
    """All deduplication knobs with their defaults.

    `shingle` and `threshold` were measured with `tools/bench/dedup_quality.py`: a document with 10%
    of its words substituted, inserted or deleted keeps an exact Jaccard similarity of 0.57-0.70
    (median 0.63) to its source over 3-word shingles, while random documents score at most ~0.01.
    At 0.5 the MinHash estimate (std ~0.04 with 128 permutations) still finds >= 99.7% of copies
    edited by exactly 10% with no false positives. 5-word shingles put such copies at 0.33 (min) to 0.47
    (median), into the noise, and with the common threshold of 0.8 only copies with < ~3% edits are
    caught (recall 0.30 for edits up to 10%); 2-word shingles also work (copies >= 0.69) but overlap
    more between unrelated real texts.
    """
    c = ConfigDict()
    c.exact = True  # drop documents whose lower-cased, whitespace-collapsed text was seen before
    c.near = True  # drop near-duplicates of earlier kept documents (MinHash + LSH)
    c.threshold = 0.5  # estimated Jaccard similarity of word-shingle sets at or above which a document is dropped
    c.num_perm = 128  # MinHash permutations (signature length); the estimate's std is sqrt(J(1-J)/num_perm)
    c.bands = 0  # LSH bands; 0 = choose from threshold and num_perm (see `lsh_params`)
    c.rows = 0  # signature rows per LSH band; 0 = choose from threshold and num_perm
    c.shingle = 3  # words per shingle; documents with fewer words are one shingle
    c.seed = 0  # seed of the MinHash permutations
    c.decontaminate = d = ConfigDict()
    d.files = ""  # comma-separated globs of evaluation files; "" = no decontamination
    d.ngram = 13  # drop training documents sharing a word n-gram of this length with any evaluation file
    return c


def exact_key(text: str) -> bytes:
    """128-bit blake2b hash of `text` lower-cased with whitespace runs collapsed to one space."""
    normalized = " ".join(text.lower().split())
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()


def _save_npz(path: str | Path, state: dict[str, np.ndarray]) -> None:
    """Write `state` to `path` atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **state)  # to a file object: given a name, numpy would append ".npz" to it


def _load_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


class ExactDedup:
    """Seen-set of `exact_key`s: a text is a duplicate if its normalised form was seen before."""

    def __init__(self, keys: Iterable[bytes] = ()):
        self._seen: set[bytes] = set(keys)

    def is_duplicate(self, text: str) -> bool:
        """True if `text` was seen before; otherwise remembers it and returns False."""
        key = exact_key(text)
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def __len__(self) -> int:
        return len(self._seen)

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"keys": [n, KEY_BYTES] uint8}."""
        joined = b"".join(self._seen)
        return {"keys": np.frombuffer(joined, np.uint8).reshape(-1, KEY_BYTES)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "ExactDedup":
        return cls(row.tobytes() for row in np.asarray(state["keys"], np.uint8))

    def save(self, path: str | Path) -> None:
        _save_npz(path, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ExactDedup":
        return cls.from_state(_load_npz(path))


class NearDedup:
    """Incremental MinHash-LSH near-duplicate filter with keep-first semantics.

    A document is dropped if one of its LSH band buckets holds an earlier kept document (of an
    earlier batch or earlier in the same batch) whose signature agrees with its own on at least
    `threshold` of the entries, i.e. estimated Jaccard >= threshold. Decisions do not depend on how
    the stream is cut into batches. State per kept document: the low 16 bits of its signature
    entries for the comparison (2 * num_perm bytes; unequal entries agree by chance with probability
    2^-16, a negligible bias) and its band keys in a (key -> kept index) table (12 bytes per band).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        num_perm: int = 128,
        bands: int = 0,
        rows: int = 0,
        shingle: int = 3,
        seed: int = 0,
    ):
        """`bands`/`rows` 0 = chosen by `lsh_params` (one of them 0: num_perm // the other)."""
        if num_perm < 1 or shingle < 1 or bands < 0 or rows < 0:
            raise ConfigError(
                f"need num_perm >= 1, shingle >= 1, bands/rows >= 0; got {num_perm}, {shingle}, {bands}, {rows}"
            )
        auto_bands, auto_rows = lsh_params(threshold, num_perm)
        if bands and not rows:
            rows = num_perm // bands
        elif rows and not bands:
            bands = num_perm // rows
        elif not bands:
            bands, rows = auto_bands, auto_rows
        if not 1 <= bands * rows <= num_perm:
            raise ConfigError(f"bands * rows = {bands} * {rows} must be in [1, num_perm = {num_perm}]")
        self.threshold, self.num_perm, self.shingle, self.seed = float(threshold), num_perm, shingle, seed
        self.bands, self.rows = bands, rows
        self._signatures = np.zeros((0, num_perm), np.uint16)
        self._size = 0
        self._table = BucketTable()

    @classmethod
    def from_config(cls, cfg: ConfigDict) -> "NearDedup":
        """From a `dedup_config()` section."""
        return cls(cfg.threshold, cfg.num_perm, cfg.bands, cfg.rows, cfg.shingle, cfg.seed)

    def __len__(self) -> int:
        """Number of kept documents."""
        return self._size

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        return minhash_signatures(texts, self.num_perm, self.shingle, self.seed)

    def filter_batch(self, texts: Sequence[str]) -> list[bool]:
        """True = keep, in order; kept documents join the index."""
        return self.filter_signatures(self.signatures(texts)).tolist()

    def _similar(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether rows of `a` and `b` agree on at least `threshold` of their entries."""
        return (a == b).sum(-1) >= self.threshold * self.num_perm

    def filter_signatures(self, signatures: np.ndarray) -> np.ndarray:
        """Bool keep mask for a batch of `signatures` (as from `signatures`); kept rows join the index."""
        keys = band_keys(signatures, self.bands, self.rows)
        short = signatures.astype(np.uint16)  # low 16 bits
        keep = ~self._matches_index(short, keys)
        self._match_within_batch(short, keys, keep)
        kept = np.flatnonzero(keep)
        ids = np.arange(self._size, self._size + len(kept))
        self._append(short[kept])
        self._table.add(keys[kept].ravel(), np.repeat(ids, self.bands))
        return keep

    def _matches_index(self, signatures: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Bool mask: the document matches a kept document of an earlier batch."""
        query, found = self._table.lookup(keys.ravel())
        pairs = np.unique((query // self.bands).astype(np.uint64) << np.uint64(32) | found.astype(np.uint64))
        doc, kept = (pairs >> np.uint64(32)).astype(np.int64), (pairs & np.uint64(MASK32)).astype(np.int64)
        dup = np.zeros(len(signatures), bool)
        for lo in range(0, len(pairs), CHUNK_PAIRS):
            d, k = doc[lo : lo + CHUNK_PAIRS], kept[lo : lo + CHUNK_PAIRS]
            dup[d[self._similar(signatures[d], self._signatures[k])]] = True
        return dup

    def _match_within_batch(self, signatures: np.ndarray, keys: np.ndarray, keep: np.ndarray) -> None:
        """Clear `keep` for documents matching an earlier kept document of the same batch, in order."""
        alive = np.flatnonzero(keep)
        flat_keys, flat_docs = keys[alive].ravel(), np.repeat(alive, self.bands)
        order = np.argsort(flat_keys, kind="stable")
        flat_keys, flat_docs = flat_keys[order], flat_docs[order]
        new_key = np.ones(len(flat_keys), bool)
        new_key[1:] = flat_keys[1:] != flat_keys[:-1]
        group = np.cumsum(new_key) - 1
        shared = np.bincount(group, minlength=1)[group] > 1  # buckets holding several documents
        group, flat_docs = group[shared], flat_docs[shared]
        order = np.lexsort((group, flat_docs))
        kept_in: dict[int, list[int]] = {}  # bucket group -> kept documents of this batch, in order
        pairs = zip(flat_docs[order].tolist(), group[order].tolist(), strict=True)
        for doc, items in itertools.groupby(pairs, key=lambda p: p[0]):
            groups = [g for _, g in items]
            earlier = sorted({k for g in groups for k in kept_in.get(g, ())})
            if earlier and self._similar(signatures[earlier], signatures[doc]).any():
                keep[doc] = False
            else:
                for g in groups:
                    kept_in.setdefault(g, []).append(doc)

    def _append(self, signatures: np.ndarray) -> None:
        """Add kept signatures, doubling the buffer when full."""
        end = self._size + len(signatures)
        if end > len(self._signatures):
            grown = np.zeros((max(end, 2 * len(self._signatures), 1024), self.num_perm), np.uint16)
            grown[: self._size] = self._signatures[: self._size]
            self._signatures = grown
        self._signatures[self._size : end] = signatures
        self._size = end

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters, kept (16-bit) signatures and the band table as numpy arrays (views; do not modify)."""
        params = (self.num_perm, self.bands, self.rows, self.shingle, self.seed)
        table = {f"band_{k}": v for k, v in self._table.state_dict().items()}
        return {
            "threshold": np.float64(self.threshold),
            "params": np.array(params, np.int64),
            "signatures": self._signatures[: self._size],
            **table,
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "NearDedup":
        num_perm, bands, rows, shingle, seed = (int(p) for p in state["params"])
        near = cls(float(state["threshold"]), num_perm, bands, rows, shingle, seed)
        near._append(np.asarray(state["signatures"], np.uint16))
        near._table = BucketTable.from_state({k: state[f"band_{k}"] for k in ("keys", "values", "runs")})
        return near

    def save(self, path: str | Path) -> None:
        _save_npz(path, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> "NearDedup":
        return cls.from_state(_load_npz(path))


def _glob_files(patterns: str) -> list[str]:
    """Sorted files matching comma-separated globs; `DataError` naming a glob that matches no file."""
    files: set[str] = set()
    for pattern in filter(None, (p.strip() for p in patterns.split(","))):
        matched = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        if not matched:
            raise DataError(f"decontamination glob {pattern!r} matches no file")
        files.update(matched)
    return sorted(files)


class Decontaminator:
    """Flags documents that share a word n-gram of length `ngram` with any evaluation text.

    Evaluation texts shorter than `ngram` words contribute nothing. The n-grams are kept as a sorted
    uint64 array of hashes (8 bytes per distinct n-gram).
    """

    def __init__(self, eval_texts: Iterable[str], ngram: int = 13):
        if ngram < 1:
            raise ConfigError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        texts, parts = list(eval_texts), [np.zeros(0, np.uint64)]
        for lo in range(0, len(texts), CHUNK_DOCS):
            parts.append(self._ngrams(texts[lo : lo + CHUNK_DOCS])[0])
        self._grams = np.unique(np.concatenate(parts))

    @classmethod
    def from_globs(cls, patterns: str, ngram: int = 13) -> "Decontaminator":
        """From the files matching comma-separated globs, each read as one text.

        Any text format works: only words count, so JSON keys merely break n-grams spanning fields.
        """
        return cls((Path(f).read_text(encoding="utf-8", errors="replace") for f in _glob_files(patterns)), ngram)

    def _ngrams(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        words, counts = word_hashes(texts)
        return ngram_hashes(words, counts, self.ngram, short_whole=False)

    def __len__(self) -> int:
        """Number of distinct evaluation n-grams."""
        return len(self._grams)

    def filter_batch(self, texts: Sequence[str]) -> list[bool]:
        """True = keep (not contaminated), in order; vectorised over the batch."""
        keep = np.ones(len(texts), bool)
        for lo in range(0, len(texts) if len(self._grams) else 0, CHUNK_DOCS):
            grams, doc = self._ngrams(texts[lo : lo + CHUNK_DOCS])
            order = np.argsort(grams)  # sorted queries make the binary search cache-friendly
            pos = np.minimum(np.searchsorted(self._grams, grams[order]), len(self._grams) - 1)
            keep[lo + doc[order[self._grams[pos] == grams[order]]]] = False
        return keep.tolist()
