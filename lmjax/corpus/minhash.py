"""MinHash signatures of word-shingle sets and LSH banding, the machinery of `dedup.NearDedup`.

A text's words are the runs of ASCII letters, digits, `_` and other non-ASCII characters than
whitespace and General Punctuation (dashes, curly quotes, ...) of its lower-cased text, so whitespace,
punctuation and markup do not matter. Words, shingles and n-grams are hashed vectorised over whole
batches of texts; `BucketTable` maps LSH band keys to the documents holding them.
"""

from collections.abc import Iterable, Sequence

import numpy as np

from lmjax.config import ConfigError

CHUNK_DOCS = 1024  # documents tokenised and hashed at once (bounds the memory of Python word lists)
CHUNK_ROWS = 8192  # shingles hashed against all permutations at once (num_perm x CHUNK_ROWS uint64)
LSH_RECALL_AT_THRESHOLD = 0.95  # least chance that a pair exactly at the threshold shares an LSH bucket
MASK32 = 0xFFFFFFFF

_WORD_BYTES = bytes(c if chr(c).isalnum() or c == ord("_") or c >= 0x80 else 32 for c in range(256))  # rest -> " "
_BASE = 0x5851F42D4C957F2D  # odd 64-bit base of the polynomial word hash
_BLOCK_POWERS = np.cumprod(np.full(4096, _BASE, np.uint64)) * np.uint64(pow(_BASE, -1, 2**64))  # BASE^0..4095
_MUL = 0x9E3779B97F4A7C15  # odd 64-bit constant salting the LSH band keys


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for LSH banding of `num_perm`-long signatures at Jaccard `threshold`.

    A pair with Jaccard similarity J agrees on one band of r rows with probability J^r, so it shares
    at least one of b bands with probability P(J) = 1 - (1 - J^r)^b: an S-curve rising around
    (1/b)^(1/r). Candidates are confirmed with the full signature afterwards, so a false positive of
    the banding only costs a comparison while a false negative is a missed duplicate. Hence the
    largest r (steepest curve, fewest candidates among unrelated documents) with b = num_perm // r
    such that P(threshold) >= LSH_RECALL_AT_THRESHOLD; pairs above the threshold are found even more
    surely. E.g. 128 permutations: threshold 0.5 -> 42 bands x 3 rows, 0.8 -> 18 x 7.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= LSH_RECALL_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _base_powers(n: int) -> np.ndarray:
    """BASE^0 .. BASE^(n-1) mod 2^64 as the outer product of block powers and `_BLOCK_POWERS`."""
    blocks = -(-n // len(_BLOCK_POWERS))
    step = pow(_BASE, len(_BLOCK_POWERS), 2**64)
    starts = np.cumprod(np.full(blocks, step, np.uint64)) * np.uint64(pow(step, -1, 2**64))
    return (starts[:, None] * _BLOCK_POWERS[None, :]).ravel()[:n]


def _span_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Polynomial hash sum_j values[start + j] * BASE^j mod 2^64 of every span [start, end) of `values`.

    Computed for all spans at once from prefix sums of values[i] * BASE^i, rescaled by BASE^-start.
    """
    n = len(values)
    powers = _base_powers(n + 1)
    prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(values * powers[:-1], dtype=np.uint64)])
    return (prefix[ends] - prefix[starts]) * powers[n - starts] * np.uint64(pow(_BASE, -n, 2**64))


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word of every text, in order; int64 word count per text).

    All texts are lower-cased, joined and hashed at once: a word's hash is the mixed polynomial hash
    of its UTF-8 bytes.
    """
    encoded = [" ".join(t.lower().split()).encode("utf-8", "surrogatepass") for t in texts]
    data = np.frombuffer(b" ".join(encoded).translate(_WORD_BYTES) + b" ", np.uint8)
    is_word = data != 32
    punct = np.flatnonzero((data[:-2] == 0xE2) & ((data[1:-1] == 0x80) | (data[1:-1] == 0x81)))  # U+2000-U+206F
    for k in range(3):
        is_word[punct + k] = False
    edges = np.diff(is_word.astype(np.int8), prepend=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    doc_ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)) + 1)
    counts = np.diff(np.searchsorted(starts, doc_ends), prepend=0)
    return _mix64(_span_hashes(data, starts, ends)), counts


def ngram_hashes(words: np.ndarray, counts: np.ndarray, n: int, short_whole: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash, document index) of every word n-gram, grouped by document in order.

    A document with fewer than `n` words has no n-grams, or one made of all its words if
    `short_whole` (an empty document then has the hash of the empty n-gram).
    """
    per_doc = np.maximum(counts - n + 1, 1 if short_whole else 0)
    doc = np.repeat(np.arange(len(counts)), per_doc)
    offset = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    first = np.repeat(np.cumsum(counts) - counts, per_doc) + offset
    length = np.minimum(counts[doc], n)
    return _mix64(_span_hashes(words, first, first + length) ^ length.astype(np.uint64)), doc


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (a, b) uint64 pairs of the hash family h(x) = (a x + b) mod 2^64, one per permutation."""
    a, b = np.random.default_rng(seed).integers(0, 2**64, size=(2, num_perm), dtype=np.uint64)
    return a, b


def _minhash(x: np.ndarray, doc: np.ndarray, num_docs: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[num_docs, num_perm] uint32 minima of the high 32 bits of a x + b per document.

    `x` are 32-bit shingle hashes grouped by `doc`; every document needs at least one. The top 32
    bits of (a x + b) mod 2^64 with random 64-bit a, b form a strongly universal family for 32-bit x
    (multiply-add-shift), and as dropping the low bits is monotone the minimum is taken on the full
    64-bit values and shifted once at the end. Values are laid out [num_perm, shingles] so that each
    permutation's per-document minima are reductions over contiguous memory.
    """
    mins = np.full((len(a), num_docs), np.iinfo(np.uint64).max, np.uint64)
    buf = np.empty((len(a), CHUNK_ROWS), np.uint64)
    for lo in range(0, len(x), CHUNK_ROWS):
        xs, ds = x[lo : lo + CHUNK_ROWS], doc[lo : lo + CHUNK_ROWS]
        values = buf[:, : len(xs)]
        np.multiply(a[:, None], xs[None, :], out=values)
        np.add(values, b[:, None], out=values)
        starts = np.flatnonzero(np.concatenate([[True], ds[1:] != ds[:-1]]))
        cols = ds[starts]
        mins[:, cols] = np.minimum(mins[:, cols], np.minimum.reduceat(values, starts, axis=1))
    return (mins.T >> np.uint64(32)).astype(np.uint32)


def minhash_signatures(texts: Sequence[str], num_perm: int = 128, shingle: int = 3, seed: int = 0) -> np.ndarray:
    """[len(texts), num_perm] uint32 MinHash signatures of the texts' word-shingle sets.

    Each shingle (`shingle` consecutive words; the whole text if it has fewer words) is hashed once
    to 32 bits, then all permutations are applied at once with vectorised universal hashing. The
    fraction of equal entries of two signatures estimates the Jaccard similarity of the two sets.
    """
    a, b = _permutations(num_perm, seed)
    out = np.empty((len(texts), num_perm), np.uint32)
    for lo in range(0, len(texts), CHUNK_DOCS):
        words, counts = word_hashes(texts[lo : lo + CHUNK_DOCS])
        hashes, doc = ngram_hashes(words, counts, shingle, short_whole=True)
        x = (hashes ^ (hashes >> np.uint64(32))) & np.uint64(MASK32)
        out[lo : lo + len(counts)] = _minhash(x, doc, len(counts), a, b)
    return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[n, bands] uint64 bucket keys: a hash of each band's rows, salted by the band index."""
    values = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    keys = np.broadcast_to(_mix64(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(_MUL)), values.shape[:2])
    for j in range(rows):
        keys = _mix64(keys ^ values[:, :, j])
    return keys


def _expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, p) for every position p in [lo[i], hi[i]), in order of i."""
    counts = hi - lo
    i = np.repeat(np.arange(len(lo)), counts)
    return i, np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(len(i))


class BucketTable:
    """A multi-map from uint64 keys to uint32 values held as a few sorted runs of numpy arrays.

    Adding a batch sorts it into a new run and merges runs like a binary counter (while the previous
    run is no larger), so there are at most log2(entries) runs and adding costs O(log n) amortised
    per entry. Memory is 12 bytes per entry.
    """

    def __init__(self, runs: Iterable[tuple[np.ndarray, np.ndarray]] = ()):
        self.runs = [(k.astype(np.uint64), v.astype(np.uint32)) for k, v in runs if len(k)]

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys, values = keys.astype(np.uint64), values.astype(np.uint32)
        while self.runs and len(self.runs[-1][0]) <= len(keys):
            old_keys, old_values = self.runs.pop()
            keys, values = np.concatenate([old_keys, keys]), np.concatenate([old_values, values])
        order = np.argsort(keys, kind="stable")  # timsort: merging sorted runs is linear
        self.runs.append((keys[order], values[order]))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into `keys`, value) of every stored entry whose key equals a query key."""
        order = np.argsort(keys)  # sorted queries make the binary searches cache-friendly
        queries = keys[order]
        found_i, found_v = [], []
        for run_keys, run_values in self.runs:
            lo, hi = np.searchsorted(run_keys, queries, "left"), np.searchsorted(run_keys, queries, "right")
            i, p = _expand_ranges(lo, hi)
            found_i.append(order[i])
            found_v.append(run_values[p])
        if not found_i:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)
        return np.concatenate(found_i), np.concatenate(found_v)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The runs concatenated ("keys", "values") and their lengths ("runs")."""
        return {
            "keys": np.concatenate([np.zeros(0, np.uint64)] + [k for k, _ in self.runs]),
            "values": np.concatenate([np.zeros(0, np.uint32)] + [v for _, v in self.runs]),
            "runs": np.array([len(k) for k, _ in self.runs], np.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "BucketTable":
        bounds = np.cumsum(state["runs"])[:-1]
        return cls(zip(np.split(state["keys"], bounds), np.split(state["values"], bounds), strict=True))
