"""Write a large, messy, seeded corpus for testing the data pipeline at scale, or scan one.

    python tools/make_corpus.py --out /tmp/corpus --size-gb 1.0 [--seed 0]
    python tools/make_corpus.py --scan /tmp/corpus

The corpus holds JSONL parts (~85% of the text), Parquet parts (~10%, with pyarrow; compressed on
disk) and small text files plus one big one (~5%). Documents are random sentences over a made-up vocabulary, with exact
duplicates and PII (emails, phone numbers, IPs, card numbers) mixed in, and junk: broken and binary
JSONL lines, missing, null, non-string and empty fields, invalid UTF-8, lone surrogates, one gigantic
line per JSONL part, empty, binary and Latin-1 text files.

--scan streams every document through `lmjax.corpus.sources.iter_records` and prints documents, skip
counts, throughput and peak RSS above the baseline after imports, as JSON.
"""

import argparse
import json
import random
import resource
import string
import time
from collections import Counter
from pathlib import Path

PART_BYTES = 64 << 20
GIANT_LINE_CHARS = 3_000_000
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "qu", "an", "er", "on"]


def make_sentences(rng: random.Random, n: int) -> list[str]:
    """`n` random sentences over a vocabulary of made-up words."""
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(4000)]
    weights = [1 / (i + 1) for i in range(len(words))]  # Zipf-like, as in real text
    sentences = []
    for _ in range(n):
        s = " ".join(rng.choices(words, weights, k=rng.randint(4, 24)))
        sentences.append(s[0].upper() + s[1:] + rng.choice(".....?!"))
    return sentences


def pii(rng: random.Random) -> str:
    user = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
    return rng.choice(
        [
            f"Contact {user}@example.{rng.choice(['com', 'org', 'net'])} for details.",
            f"Call +1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)} now.",
            f"Server at {rng.randint(1, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}.",
            "Card " + " ".join(f"{rng.randint(0, 9999):04d}" for _ in range(4)) + " expires soon.",
        ]
    )


class Documents:
    """An endless, seeded stream of clean-ish documents: random sentences, some duplicates, some PII."""

    def __init__(self, rng: random.Random):
        self.rng, self.sentences, self.recent = rng, make_sentences(rng, 50_000), []

    def __next__(self) -> str:
        rng = self.rng
        if self.recent and rng.random() < 0.05:
            return rng.choice(self.recent)
        paragraphs = [" ".join(rng.choices(self.sentences, k=rng.randint(2, 8))) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.03:
            paragraphs.insert(rng.randrange(len(paragraphs) + 1), pii(rng))
        doc = "\n\n".join(paragraphs)
        if len(self.recent) < 1000:
            self.recent.append(doc)
        else:
            self.recent[rng.randrange(1000)] = doc
        return doc


def junk_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n).replace(b"\n", b"\0")


def jsonl_line(rng: random.Random, docs: Documents, i: int) -> bytes:
    """One JSONL line: usually a good record, sometimes one of the kinds of junk."""
    r = rng.random()
    text = next(docs)
    good = {"id": i, "url": f"https://example.com/{i}", "text": text}
    if r < 0.010:
        return json.dumps(good).encode()[: rng.randint(1, 60)] + b"\n"  # truncated: broken JSON
    if r < 0.015:
        return junk_bytes(rng, rng.randint(20, 400)) + b"\n"
    if r < 0.020:
        return json.dumps({"id": i, "content": text}).encode() + b"\n"
    if r < 0.023:
        return json.dumps({"id": i, "text": None}).encode() + b"\n"
    if r < 0.027:
        return json.dumps({"id": i, "text": rng.choice([42, ["a", "b"], {"x": 1}, True])}).encode() + b"\n"
    if r < 0.030:
        return json.dumps({"id": i, "text": rng.choice(["", "   ", "\n\t"])}).encode() + b"\n"
    if r < 0.032:
        return b"\n"
    line = json.dumps(good, ensure_ascii=rng.random() < 0.5).encode()
    if r < 0.037:  # raw invalid UTF-8 bytes inside the string
        at = line.index(b'"text": "') + 9
        line = line[:at] + b"\xff\xfe\xc3" + line[at:]
    elif r < 0.038:
        line = line.replace(b'"text": "', b'"text": "\\ud800', 1)
    return line + b"\n"


def write_jsonl(path: Path, rng: random.Random, docs: Documents, size: int, start: int) -> int:
    """Write JSONL lines to `path` until it holds `size` bytes; return the next record number."""
    written, i, buf = 0, start, []
    giant_at = rng.randint(size // 4, size // 2)
    with open(path, "wb") as f:
        while written < size:
            line = jsonl_line(rng, docs, i)
            if written <= giant_at < written + len(line):
                line = json.dumps({"id": i, "text": "lorem " * (GIANT_LINE_CHARS // 6)}).encode() + b"\n"
            buf.append(line)
            written += len(line)
            i += 1
            if len(buf) >= 4096:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
    return i


def write_parquet(path: Path, rng: random.Random, docs: Documents, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    written, i = 0, 0
    with pq.ParquetWriter(path, schema) as writer:
        while written < size:
            texts = [None if rng.random() < 0.01 else next(docs) for _ in range(8192)]
            writer.write_table(pa.table({"id": range(i, i + len(texts)), "text": texts}, schema=schema))
            written += sum(len(t) for t in texts if t)
            i += len(texts)


def write_text_files(root: Path, rng: random.Random, docs: Documents, size: int) -> None:
    """Small text files (some empty, binary or Latin-1) in subfolders, plus one big file of lines."""
    written, i = 0, 0
    big = root / "big.txt"
    while written < size // 2:
        sub = root / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        r = rng.random()
        if r < 0.02:
            data = b""
        elif r < 0.04:
            data = rng.randbytes(rng.randint(100, 20_000))
        elif r < 0.06:
            data = next(docs).encode() + " café déjà vu".encode("latin-1")
        elif r < 0.07:
            data = b"  \n\n \t\n"
        else:
            data = next(docs).encode()
        (sub / f"doc-{i:06d}.txt").write_bytes(data)
        written += len(data)
        i += 1
    with open(big, "wb") as f:
        while written < size:
            line = next(docs).replace("\n", " ").encode() + b"\n"
            f.write(line)
            written += len(line)


def make_corpus(out: Path, size_gb: float, seed: int) -> None:
    rng = random.Random(seed)
    docs = Documents(rng)
    total = int(size_gb * 2**30)
    try:
        import pyarrow  # noqa: F401

        parquet_bytes = total // 10
    except ImportError:
        parquet_bytes = 0
    text_bytes = total // 20
    jsonl_bytes = total - parquet_bytes - text_bytes
    (out / "jsonl").mkdir(parents=True, exist_ok=True)
    i = 0
    for part, size in enumerate(part_sizes(jsonl_bytes)):
        i = write_jsonl(out / "jsonl" / f"part-{part:05d}.jsonl", rng, docs, size, i)
    if parquet_bytes:
        (out / "parquet").mkdir(exist_ok=True)
        for part, size in enumerate(part_sizes(parquet_bytes)):
            write_parquet(out / "parquet" / f"part-{part:05d}.parquet", rng, docs, size)
    write_text_files(out / "text", rng, docs, text_bytes)


def part_sizes(total: int) -> list[int]:
    return [min(PART_BYTES, total - start) for start in range(0, total, PART_BYTES)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def scan(out: Path) -> dict:
    """Stream the corpus under `out` through iter_records and measure it."""
    import pyarrow.parquet  # noqa: F401  (imported before the baseline, like the sources module)

    from lmjax.corpus.sources import iter_records

    patterns = {"jsonl": "jsonl/*.jsonl", "parquet": "parquet/*.parquet", "text": "text/**/*.txt"}
    specs = [f"{kind}:{out}/{pattern}" for kind, pattern in patterns.items() if (out / kind).is_dir()]
    baseline = peak_rss_mb()
    stats: Counter = Counter()
    docs = chars = 0
    start = time.perf_counter()
    for spec in specs:
        for doc in iter_records(spec, stats):
            docs += 1
            chars += len(doc.text)
    seconds = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "corpus_mb": round(disk / 2**20),
        "documents": docs,
        "chars": chars,
        "skipped": dict(sorted(stats.items())),
        "seconds": round(seconds, 1),
        "docs_per_s": round(docs / seconds),
        "mb_per_s": round(disk / 2**20 / seconds, 1),
        "baseline_rss_mb": round(baseline),
        "peak_rss_above_baseline_mb": round(peak_rss_mb() - baseline),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory to write the corpus into")
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan", type=Path, help="measure streaming over an existing corpus instead")
    args = parser.parse_args()
    if args.scan:
        print(json.dumps(scan(args.scan), indent=2))
    elif args.out:
        start = time.perf_counter()
        make_corpus(args.out, args.size_gb, args.seed)
        disk = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
        print(f"wrote {disk / 2**20:.0f} MB to {args.out} in {time.perf_counter() - start:.1f} s")
    else:
        parser.error("give --out DIR or --scan DIR")


if __name__ == "__main__":
    main()
