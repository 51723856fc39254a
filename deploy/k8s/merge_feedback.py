"""Merges the feedback databases of several `lmjax serve` replicas into one, for `lmjax feedback export`.

    python deploy/k8s/merge_feedback.py OUT_DIR feedback-lmjax-0.sqlite feedback-lmjax-1.sqlite ...
    lmjax feedback export --workdir OUT_DIR --out prefs.jsonl

Each replica of the StatefulSet keeps its own feedback.sqlite (deploy/k8s/README.md, "Feedback with replicas").
Exporting each one and concatenating the JSONL files would lose the pairs whose liked and disliked replies to the
same conversation were served by different replicas: `export_preferences` pairs them only within one database.
Merging first keeps them. Rows are copied as they are (already PII-scrubbed by the server); reply ids are
renumbered so that ratings and edits follow their reply. OUT_DIR/feedback.sqlite must not exist yet, and merging
the same database twice fails on the unique completion ids instead of counting its votes twice.

Take each input with SQLite's backup API, not by copying the file: a copy of a live WAL database misses what is
still in feedback.sqlite-wal. The README shows the `kubectl exec` commands that do it.
"""

import sqlite3
import sys
from pathlib import Path

from lmjax.serve.feedback import FILENAME, FeedbackStore

REPLY_COLUMNS = ("session_id", "conversation", "reply", "step", "settings", "created", "public_id")


def merge(out_dir: str | Path, sources: list[str | Path]) -> int:
    """Writes OUT_DIR/feedback.sqlite holding every reply, rating, edit and event of `sources`; returns the
    number of replies."""
    out = Path(out_dir) / FILENAME
    if out.exists():
        raise SystemExit(f"merge_feedback: {out} exists; merge into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    FeedbackStore(out).close()  # the current schema, migrations included
    conn = sqlite3.connect(f"file:{out.resolve()}", uri=True)  # uri: ATTACH then understands ?mode=ro
    try:
        for source in sources:
            # One transaction per source (ATTACH cannot run inside one).
            conn.execute("ATTACH DATABASE ? AS src", (f"file:{Path(source).resolve()}?mode=ro",))
            present = {row[1] for row in conn.execute("PRAGMA src.table_info(replies)")}
            columns = ", ".join(c if c in present else "NULL" for c in REPLY_COLUMNS)
            offset = conn.execute("SELECT COALESCE(MAX(id), 0) FROM replies").fetchone()[0]
            conn.execute(f"INSERT INTO replies (id, {', '.join(REPLY_COLUMNS)}) "
                         f"SELECT id + ?, {columns} FROM src.replies", (offset,))
            conn.execute("INSERT INTO ratings (reply_id, value, created) "
                         "SELECT reply_id + ?, value, created FROM src.ratings", (offset,))
            conn.execute("INSERT INTO edits (reply_id, text, created) "
                         "SELECT reply_id + ?, text, created FROM src.edits ORDER BY id", (offset,))
            conn.execute("INSERT INTO events (kind, session_id, detail, created) "
                         "SELECT kind, session_id, detail, created FROM src.events ORDER BY id")
            conn.commit()
            conn.execute("DETACH DATABASE src")
        return conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except BaseException:
        conn.close()
        for path in out.parent.glob(FILENAME + "*"):  # no half-merged database left behind
            path.unlink()
        raise
    finally:
        conn.close()

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    replies = merge(sys.argv[1], sys.argv[2:])
    print(f"merged {len(sys.argv) - 2} feedback databases ({replies} replies) into {sys.argv[1]}/{FILENAME}")
