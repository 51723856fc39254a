"""Near-duplicate detection quality and speed: lmjax `NearDedup` vs `datasketch` MinHash + MinHashLSH.

A seeded synthetic corpus of distinct random documents (50-300 words drawn from a Zipfian vocabulary
of fake words) gets planted near-duplicates: copies of random earlier documents with up to
`--max-edit` of their words substituted, inserted or deleted, placed after their source. Both
implementations stream the corpus in order with keep-first semantics; recall is the fraction of
planted copies removed, precision the fraction of removed documents that are planted copies.

Each run happens in a fresh process whose peak RSS (`resource.getrusage`) is reset after building
the corpus (Linux `/proc/self/clear_refs`), so "peak MB" is the peak while deduplicating (corpus
included) and "dedup MB" its growth over the RSS before deduplicating. First a table of exact
shingle-set Jaccard similarities (planted copies at exactly `--max-edit` edits vs random pairs)
shows how the shingle size separates the two populations, which is how the defaults were chosen.

    .venv/bin/python tools/bench/dedup_quality.py                  # 100k + 10k planted; datasketch on 20k
    .venv/bin/python tools/bench/dedup_quality.py --exact-edit     # every copy has exactly max-edit edits
"""

import argparse
import re
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lmjax.corpus.dedup import NearDedup, dedup_config  # noqa: E402

_WORD = re.compile(r"\w+")


def fake_vocab(size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` distinct random lower-case words of 2-10 letters."""
    words: dict[str, None] = {}
    while len(words) < size:
        lengths = rng.integers(2, 11, size)
        letters = rng.integers(97, 123, (size, 10), dtype=np.uint8)
        words.update(dict.fromkeys(row[:n].tobytes().decode() for row, n in zip(letters, lengths, strict=True)))
    return np.array(list(words)[:size])


def edit(words: list[str], num_edits: int, vocab: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> list[str]:
    """`words` with `num_edits` random substitutions, insertions or deletions of single words."""
    words = list(words)
    for op, new in zip(rng.integers(0, 3, num_edits), rng.choice(vocab, num_edits, p=p), strict=True):
        i = int(rng.integers(len(words)))
        if op == 0:
            words[i] = str(new)
        elif op == 1:
            words.insert(i, str(new))
        elif len(words) > 1:
            del words[i]
    return words


def make_corpus(
    docs: int, planted: int, max_edit: float, exact_edit: bool, seed: int, vocab_size: int = 20_000
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts in stream order, stream index of each copy's source (-1 for originals), fraction of words edited)."""
    rng = np.random.default_rng(seed)
    vocab = fake_vocab(vocab_size, rng)
    words = vocab.tolist()
    p = 1 / np.arange(1, vocab_size + 1)
    p /= p.sum()
    lengths = rng.integers(50, 301, docs)
    ids = rng.choice(vocab_size, lengths.sum(), p=p)
    texts = [" ".join(map(words.__getitem__, chunk.tolist())) for chunk in np.split(ids, np.cumsum(lengths)[:-1])]
    del ids
    sources = rng.integers(0, docs, planted)
    fractions = np.full(planted, max_edit) if exact_edit else rng.uniform(0, max_edit, planted)
    edited = np.zeros(planted)
    for k, (s, f) in enumerate(zip(sources, fractions, strict=True)):
        num_edits = max(1, int(f * lengths[s]))
        texts.append(" ".join(edit(texts[s].split(), num_edits, vocab, p, rng)))
        edited[k] = num_edits / lengths[s]
    slots = np.concatenate([np.arange(docs), rng.integers(sources + 1, docs + 1) - 0.5])  # each copy after its source
    order = np.argsort(slots, kind="stable")
    position = np.argsort(order)  # stream index of each generated document
    source = np.concatenate([np.full(docs, -1), position[sources]])
    return [texts[i] for i in order], source[order], np.concatenate([np.zeros(docs), edited])[order]


def separation(shingles: tuple[int, ...], pairs: int, max_edit: float, seed: int) -> None:
    """Print exact Jaccard percentiles of copies with exactly `max_edit` edits vs random document pairs."""
    texts, source, _ = make_corpus(pairs, pairs, max_edit, True, seed + 1)
    docs = [_WORD.findall(t.lower()) for t in texts]
    copies = np.flatnonzero(source >= 0)
    a, b = np.random.default_rng(seed).choice(np.flatnonzero(source < 0), (2, pairs))
    print(
        f"\nexact Jaccard of word-shingle sets: {pairs} copies with {max_edit:.0%} of words edited vs their "
        f"sources | {pairs} random pairs"
    )
    print(f"{'shingle':>7} | {'min':>6} {'p1':>6} {'p5':>6} {'median':>6} | {'median':>6} {'p99.9':>6} {'max':>6}")
    for n in shingles:
        grams = [{tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))} for w in docs]

        def jaccard(i, j, grams=grams):
            return len(grams[i] & grams[j]) / len(grams[i] | grams[j])

        near = [jaccard(i, j) for i, j in zip(copies, source[copies], strict=True)]
        rand = [jaccard(i, j) for i, j in zip(a, b, strict=True) if i != j]
        c, r = np.percentile(near, [0, 1, 5, 50]), np.percentile(rand, [50, 99.9, 100])
        print(f"{n:>7} | {c[0]:>6.3f} {c[1]:>6.3f} {c[2]:>6.3f} {c[3]:>6.3f} | {r[0]:>6.3f} {r[1]:>6.3f} {r[2]:>6.3f}")


def run_lmjax(texts: list[str], cfg, batch: int) -> tuple[np.ndarray, float]:
    """(keep mask, bytes of saved state per kept document)."""
    near = NearDedup.from_config(cfg)
    keep = []
    for lo in range(0, len(texts), batch):
        keep += near.filter_batch(texts[lo : lo + batch])
    return np.array(keep), sum(v.nbytes for v in near.state_dict().values()) / len(near)


def run_datasketch(texts: list[str], cfg, batch: int) -> tuple[np.ndarray, float]:
    """The same algorithm with datasketch, one document at a time (`batch` unused): shingle, MinHash,
    query the LSH, confirm candidates by estimated Jaccard, insert if kept."""
    from datasketch import MinHash, MinHashLSH

    probe = NearDedup.from_config(cfg)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(probe.bands, probe.rows))
    kept, keep = {}, []
    for i, text in enumerate(texts):
        words, n = _WORD.findall(text.lower()), cfg.shingle
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([" ".join(words[j : j + n]).encode() for j in range(max(len(words) - n + 1, 1))])
        dup = any(kept[c].jaccard(m) >= cfg.threshold for c in lsh.query(m))
        if not dup:
            lsh.insert(i, m)
            kept[i] = m
        keep.append(not dup)
    return np.array(keep), float("nan")


def measure(impl: str, docs: int, planted: int, args: argparse.Namespace) -> dict:
    """Build the corpus and deduplicate it with `impl`; runs in its own process."""
    texts, source, edited = make_corpus(docs, planted, args.max_edit, args.exact_edit, args.seed)
    is_planted = source >= 0
    cfg = dedup_config()
    cfg.threshold, cfg.shingle, cfg.num_perm = args.threshold, args.shingle, args.num_perm
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    except OSError:
        print("cannot reset the peak RSS: peak MB includes building the corpus")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    keep, state_bytes = (run_lmjax if impl == "lmjax" else run_datasketch)(texts, cfg, args.batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    removed = ~keep
    hard = is_planted & (edited > 0.8 * args.max_edit)
    return {
        "impl": impl, "docs": len(texts), "planted": int(is_planted.sum()),
        "recall": (removed & is_planted).sum() / is_planted.sum(),
        "recall_hard": (removed & hard).sum() / max(hard.sum(), 1),
        "precision": (removed & is_planted).sum() / max(removed.sum(), 1),
        "docs_s": len(texts) / seconds, "seconds": seconds, "peak_mb": peak, "dedup_mb": peak - base,
        "state_b": state_bytes,
    }  # fmt: skip


def in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main() -> None:
    defaults = dedup_config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000, help="distinct random documents")
    p.add_argument("--planted", type=int, default=10_000, help="planted near-duplicate copies")
    p.add_argument("--ds-docs", type=int, default=20_000, help="distinct documents of the datasketch comparison")
    p.add_argument("--ds-planted", type=int, default=2_000, help="planted copies of the datasketch comparison")
    p.add_argument("--max-edit", type=float, default=0.10, help="largest fraction of a copy's words edited")
    p.add_argument("--exact-edit", action="store_true", help="edit exactly --max-edit of every copy's words")
    p.add_argument("--threshold", type=float, default=defaults.threshold, help="Jaccard threshold")
    p.add_argument("--shingle", type=int, default=defaults.shingle, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=defaults.num_perm, help="MinHash permutations")
    p.add_argument("--batch", type=int, default=10_000, help="documents per filter_batch call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--separation-pairs", type=int, default=1_000, help="pairs per shingle size; 0 = skip that table")
    p.add_argument("--no-datasketch", action="store_true", help="skip the datasketch comparison")
    args = p.parse_args()

    near = NearDedup(args.threshold, args.num_perm, shingle=args.shingle)
    edits = f"exactly {args.max_edit:.0%}" if args.exact_edit else f"uniform in (0, {args.max_edit:.0%}]"
    print(
        f"threshold {args.threshold}, shingle {args.shingle}, num_perm {args.num_perm}, LSH {near.bands} bands x "
        f"{near.rows} rows; copies have {edits} of their words edited; batches of {args.batch}"
    )
    if args.separation_pairs:
        separation((1, 2, 3, 4, 5), args.separation_pairs, args.max_edit, args.seed)
    runs = [("lmjax", args.docs, args.planted)]
    if not args.no_datasketch:
        runs += [("lmjax", args.ds_docs, args.ds_planted), ("datasketch", args.ds_docs, args.ds_planted)]
    print(
        f"\n{'impl':<10} {'docs':>7} {'planted':>7} {'recall':>7} {'r@>80%':>7} {'prec':>7} {'docs/s':>8} "
        f"{'sec':>6} {'peak MB':>8} {'dedup MB':>8} {'B/kept':>6}"
    )
    results = []
    for impl, docs, planted in runs:
        r = in_fresh_process(impl, docs, planted, args)
        results.append(r)
        print(
            f"{r['impl']:<10} {r['docs']:>7} {r['planted']:>7} {r['recall']:>7.4f} {r['recall_hard']:>7.4f} "
            f"{r['precision']:>7.4f} {r['docs_s']:>8,.0f} {r['seconds']:>6.1f} {r['peak_mb']:>8.0f} "
            f"{r['dedup_mb']:>8.0f} {r['state_b']:>6.0f}",
            flush=True,
        )
    print(
        "r@>80%: recall on copies with more than 80% of --max-edit edited (the hardest ones); "
        "B/kept: saved index bytes per kept document"
    )
    if len(results) == 3:
        ours, theirs = results[1], results[2]
        faster = "lmjax" if ours["docs_s"] > theirs["docs_s"] else "datasketch"
        ratio = max(ours["docs_s"], theirs["docs_s"]) / min(ours["docs_s"], theirs["docs_s"])
        print(f"faster on the same {ours['docs']} documents: {faster} ({ratio:.1f}x)")


if __name__ == "__main__":
    main()
