"""The feedback store: replies, ratings, edits and filter events in one SQLite file in the run directory.

    replies   id, session id, conversation (the messages the reply answers, JSON), reply text, model step,
              sampling settings (JSON), time, public id (the API's completion id and choice, e.g. "chatcmpl-1:0")
    ratings   reply id (one row per reply, the latest vote), +1 / -1, time
    edits     reply id, the user's corrected text, time
    events    kind (e.g. "blocked_input"), session id, detail (JSON), time

WAL journal with synchronous=FULL: a write is durable once its call returns, even if the server is then
killed. Each thread has its own connection. `export_preferences` turns the votes and edits into DPO pairs.

Privacy: by default every stored text (conversations, replies, edits, filter events) first goes through the
project's PII scrubber (e-mails, phone numbers, IPs, card numbers become placeholders). `purge` deletes by age
or by session/public id, with SQLite's secure_delete on, so deleted text is overwritten in the file.
"""

import itertools
import json
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lmjax.corpus.pii import scrub_pii
from lmjax.text.chat_template import Message

FILENAME = "feedback.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, conversation TEXT NOT NULL, reply TEXT NOT NULL,
    step INTEGER, settings TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
    reply_id INTEGER PRIMARY KEY REFERENCES replies(id), value INTEGER NOT NULL CHECK (value IN (-1, 1)),
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY, reply_id INTEGER NOT NULL REFERENCES replies(id), text TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, session_id TEXT NOT NULL, detail TEXT NOT NULL,
    created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS replies_conversation ON replies(conversation);
"""
MIGRATIONS = (  # columns added after the first release: (table, column, definition)
    ("replies", "public_id", "TEXT"),
)


def conversation_key(messages: Sequence[Message]) -> str:
    """Canonical JSON of a conversation: equal conversations give equal keys."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)


class FeedbackStore:
    """Thread-safe writer and reader of a feedback database (`FILENAME` in a run directory)."""

    def __init__(self, path: str | Path, scrub: bool = True):
        path = Path(path)
        self.path = path / FILENAME if path.is_dir() else path
        self.scrub = scrub
        self._local = threading.local()
        with self._conn() as conn:
            conn.executescript(SCHEMA)
            for table, column, definition in MIGRATIONS:
                if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS replies_public_id ON replies(public_id)")

    @classmethod
    def for_workdir(cls, workdir: str | Path, scrub: bool = True) -> "FeedbackStore":
        return cls(Path(workdir) / FILENAME, scrub)

    def _clean(self, text: str) -> str:
        return scrub_pii(text)[0] if self.scrub else text

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
        return conn

    def _write(self, sql: str, args: tuple) -> int:
        conn = self._conn()
        with conn:  # commits (durably) or rolls back
            return conn.execute(sql, args).lastrowid

    def record_reply(self, messages: Sequence[Message], reply: str, step: int | None = None,
                     settings: dict | None = None, session_id: str = "", public_id: str | None = None) -> int:
        """Stores a reply to `messages` (the conversation it answers); returns its id."""
        messages = [{**m, "content": self._clean(m["content"])} for m in messages]
        return self._write("INSERT INTO replies (session_id, conversation, reply, step, settings, created, "
                           "public_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (session_id, conversation_key(messages), self._clean(reply), step,
                            json.dumps(settings or {}), time.time(), public_id))

    def find_reply(self, public_id: str) -> int | None:
        """The id of the reply stored under `public_id`, or None."""
        rows = self.query("SELECT id FROM replies WHERE public_id = ?", (public_id,))
        return rows[0][0] if rows else None

    def purge(self, older_than: float | None = None, session_id: str | None = None) -> int:
        """Deletes the replies (with their ratings and edits) and events stored before time `older_than` or
        under `session_id` (a session or public id); returns how many replies went."""
        if (older_than is None) == (session_id is None):
            raise ValueError("purge takes exactly one of older_than and session_id")
        where, args = (("created < ?", (older_than,)) if older_than is not None else
                       ("session_id = ? OR public_id = ? OR public_id LIKE ? ESCAPE '\\'",
                        (session_id, session_id, session_id.replace("%", "\\%").replace("_", "\\_") + ":%")))
        conn = self._conn()
        with conn:
            ids = f"SELECT id FROM replies WHERE {where}"
            conn.execute(f"DELETE FROM ratings WHERE reply_id IN ({ids})", args)
            conn.execute(f"DELETE FROM edits WHERE reply_id IN ({ids})", args)
            count = conn.execute(f"DELETE FROM replies WHERE {where}", args).rowcount
            conn.execute("DELETE FROM events WHERE " + ("created < ?" if older_than is not None else "session_id = ?"),
                         (older_than,) if older_than is not None else (session_id,))
        return count

    def rate(self, reply_id: int, value: int) -> None:
        """Stores a +1 / -1 vote on a reply, replacing an earlier vote."""
        if value not in (-1, 1):
            raise ValueError(f"a rating is +1 or -1, got {value!r}")
        self._write("INSERT INTO ratings (reply_id, value, created) VALUES (?, ?, ?) ON CONFLICT(reply_id) "
                    "DO UPDATE SET value = excluded.value, created = excluded.created", (reply_id, value, time.time()))

    def unrate(self, reply_id: int) -> None:
        """Withdraws the vote on a reply."""
        self._write("DELETE FROM ratings WHERE reply_id = ?", (reply_id,))

    def edit(self, reply_id: int, text: str) -> int:
        """Stores the user's correction of a reply; returns the edit's id."""
        return self._write("INSERT INTO edits (reply_id, text, created) VALUES (?, ?, ?)",
                           (reply_id, self._clean(text), time.time()))

    def log_event(self, kind: str, session_id: str = "", **detail) -> int:
        """Stores an event such as a filter block; returns its id."""
        detail = {k: self._clean(v) if isinstance(v, str) else v for k, v in detail.items()}
        return self._write("INSERT INTO events (kind, session_id, detail, created) VALUES (?, ?, ?, ?)",
                           (kind, session_id, json.dumps(detail, ensure_ascii=False), time.time()))

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a read-only query."""
        return self._conn().execute(sql, args).fetchall()

    def close(self) -> None:
        """Closes this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def export_preferences(db_path: str | Path) -> list[dict]:
    """DPO pairs {"prompt": messages, "chosen": text, "rejected": text} from (a) every liked and disliked
    reply to the same conversation and (b) every disliked reply and the user's latest edit of it."""
    conn = sqlite3.connect(Path(db_path), timeout=30)
    try:
        rated = conn.execute("SELECT r.conversation, r.reply, g.value FROM replies r "
                             "JOIN ratings g ON g.reply_id = r.id ORDER BY r.id").fetchall()
        edited = conn.execute(
            "SELECT r.conversation, r.reply, e.text FROM replies r JOIN ratings g ON g.reply_id = r.id "
            "JOIN edits e ON e.reply_id = r.id WHERE g.value = -1 AND e.id = "
            "(SELECT MAX(id) FROM edits WHERE reply_id = r.id) ORDER BY r.id").fetchall()
    finally:
        conn.close()
    votes: dict[str, dict[int, list[str]]] = defaultdict(lambda: {1: [], -1: []})
    for conversation, reply, value in rated:
        votes[conversation][value].append(reply)
    pairs = []
    for conversation, by_vote in votes.items():
        for chosen, rejected in itertools.product(by_vote[1], by_vote[-1]):
            if chosen != rejected:
                pairs.append({"prompt": json.loads(conversation), "chosen": chosen, "rejected": rejected})
    for conversation, reply, text in edited:
        if text.strip() and text != reply:
            pairs.append({"prompt": json.loads(conversation), "chosen": text, "rejected": reply})
    return pairs
