"""Serving: the chat engine, the content filter, the feedback store, the Gradio demo and `lmjax chat`."""

import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from lmjax.serve.engine import ChatEngine
from lmjax.serve.feedback import FeedbackStore, export_preferences
from lmjax.serve.safety import REFUSAL, ContentFilter
from lmjax.text.blocklist import Blocklist

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

GREEDY = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def engine(trained_run) -> ChatEngine:
    return ChatEngine.from_workdir(trained_run[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_engine_streams_and_compiles_nothing_after_warmup(engine):
    engine.warmup()
    compiled = engine.engine.compilations()
    messages = [{"role": "system", "content": "Be brief."}, user("What does len do?")]
    for turn in range(3):
        settings = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 10, "seed": turn}
        texts = list(engine.stream_reply(messages, **settings))
        assert 1 <= len(texts) <= 10 and len(set(texts)) == len(texts), texts  # one text per new token at most
        # The reply so far, growing (a character whose bytes have not all come yet shows as U+FFFD meanwhile).
        assert all(b.startswith(a.rstrip("\ufffd")) for a, b in zip(texts[:-1], texts[1:], strict=True)), texts
        assert texts[-1] == engine.reply(messages, **settings)  # the same seed samples the same reply
        messages += [{"role": "assistant", "content": texts[-1]}, user(f"And {turn}?")]
    assert engine.engine.compilations() == compiled
    assert list(engine.stream_reply(messages[:2], **GREEDY))[-1] == engine.reply(messages[:2], **GREEDY)
    card = engine.model_card()
    assert card["family"] == "llama" and card["step"] == 24 and card["params"] > 0
    assert "val_loss" in card["val"]


def test_engine_trims_oldest_turns_keeping_system(engine):
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(12):
        turns += [user(f"q{i}"), {"role": "assistant", "content": f"a{i}"}]
    messages = [system, *turns, user("last")]
    kept = engine.trim_to_context(messages, max_new_tokens=16)
    assert kept[0] == system and kept[-1] == messages[-1] and kept[1]["role"] == "user"
    assert 3 <= len(kept) < len(messages) and kept[1:] == messages[-(len(kept) - 1):]
    assert len(engine.prompt_ids(messages, 16)) <= engine.context - 16
    assert engine.trim_to_context([system, user("hi")], 16) == [system, user("hi")]
    with pytest.raises(ValueError, match="shorten"):
        engine.trim_to_context([system, user("word " * 200)], 16)
    assert engine.reply(messages, **GREEDY) is not None


def test_filter_blocks_input_and_streamed_output(engine, tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    messages = [user("What does len do?")]
    reply = engine.reply(messages, **GREEDY)
    word = next((w for w in reply.split() if w.isalpha()), None)
    if word is None:
        pytest.skip(f"the tiny model wrote no plain word: {reply!r}")
    content_filter = ContentFilter(Blocklist(words=(word, "forbidden")), store)
    assert content_filter.check("a FORBIDDEN thing") == "forbidden" and content_filter.check("fine") is None
    assert content_filter.screen_input("tell me the forbidden thing", "s1")
    assert not content_filter.screen_input("tell me a story", "s1")
    out = list(content_filter.screen_stream(engine.stream_reply(messages, **GREEDY), "s2"))
    assert out[-1] == REFUSAL and all(word.lower() not in t.lower() for t in out)
    growing = list(ContentFilter(Blocklist(words=("bad",))).screen_stream(iter(["a", "a bad", "a badger"])))
    assert growing == ["a", "a badger"]  # "bad" at the end may still grow into another word
    events = store.query("SELECT kind, session_id FROM events ORDER BY id")
    assert events == [("blocked_input", "s1"), ("blocked_output", "s2")]


def test_feedback_round_trip_and_preferences(tmp_path):
    store = FeedbackStore(tmp_path)
    prompt = [user("What does len do?")]
    liked = store.record_reply(prompt, "It counts items.", 24, {"temperature": 0.7}, "s")
    disliked = store.record_reply(prompt, "It is a cat.", 24, {"temperature": 0.7}, "s")
    other = store.record_reply([user("hi")], "bye", 24, {}, "t")
    unrated = store.record_reply(prompt, "Maybe.", 24, {}, "s")
    store.rate(liked, 1)
    store.rate(disliked, 1)
    store.rate(disliked, -1)  # a later vote replaces the first
    store.rate(other, -1)
    store.edit(other, "Hello!")
    with pytest.raises(ValueError):
        store.rate(unrated, 2)
    assert store.query("SELECT reply_id, value FROM ratings ORDER BY reply_id") == [(1, 1), (2, -1), (3, -1)]
    pairs = export_preferences(store.path)
    assert {"prompt": prompt, "chosen": "It counts items.", "rejected": "It is a cat."} in pairs
    assert {"prompt": [user("hi")], "chosen": "Hello!", "rejected": "bye"} in pairs
    assert len(pairs) == 2
    assert store.path == tmp_path / "feedback.sqlite"


def test_committed_rating_survives_kill_9(tmp_path):
    db = tmp_path / "feedback.sqlite"
    code = ("import sys, time\nfrom lmjax.serve.feedback import FeedbackStore\n"
            f"s = FeedbackStore({str(db)!r})\nr = s.record_reply([{{'role': 'user', 'content': 'q'}}], 'a')\n"
            "s.rate(r, -1)\nprint(r, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    reply_id = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM ratings WHERE reply_id = ?", (reply_id,)).fetchall() == [(-1,)]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest.fixture(scope="module")
def demo_server(engine, tmp_path_factory):
    """(url, store) of the demo serving `engine` on a free port, blocking the word "forbidden"."""
    from lmjax.serve.demo import launch

    store = FeedbackStore(tmp_path_factory.mktemp("demo") / "feedback.sqlite")
    engine.warmup()
    port = free_port()
    demo = launch(engine, store, ContentFilter(Blocklist(words=("forbidden",)), store), port=port, block=False)
    yield f"http://127.0.0.1:{port}/", store
    demo.close()


def test_demo_streams_a_reply_through_gradio_client(demo_server):
    from gradio_client import Client

    url, store = demo_server
    client = Client(url, verbose=False)
    job = client.submit("What does len do?", "Be brief.", 0.7, 0.9, 16, api_name="/chat")
    _, chat, = job.result()[:2]
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert len(job.outputs()) >= 3  # the user's message, then the reply as it grows
    reply = chat[-1]["content"][0]["text"]
    rows = store.query("SELECT reply, conversation, step FROM replies")
    assert (reply.split(), 24) in [(r.split(), s) for r, _, s in rows]  # the Chatbot may re-space lines
    client.close()


def test_demo_serves_several_people_at_once(demo_server, engine):
    """Three browser sessions asking at the same time are decoded in the same engine steps."""
    from gradio_client import Client

    url, _ = demo_server
    running = []
    step = engine.engine.step

    def counting_step():
        running.append(engine.engine.load()[0])
        return step()

    engine.engine.step = counting_step
    try:
        clients = [Client(url, verbose=False) for _ in range(3)]
        jobs = [c.submit(f"What does zip do? {i}", "", 1.0, 1.0, 24, api_name="/chat") for i, c in enumerate(clients)]
        chats = [job.result()[1] for job in jobs]
    finally:
        del engine.engine.step
    assert all(chat[-1]["role"] == "assistant" for chat in chats)
    assert max(running) >= 2
    for c in clients:
        c.close()


def test_demo_refuses_blocked_input(demo_server):
    from gradio_client import Client

    url, store = demo_server
    client = Client(url, verbose=False)
    chat = client.predict("say the forbidden word", api_name="/chat")[1]
    assert chat[-1]["content"][0]["text"] == REFUSAL
    assert ("blocked_input",) in store.query("SELECT kind FROM events")
    client.close()


def test_chat_cli_with_piped_stdin(trained_run, monkeypatch, capsys):
    from lmjax.cli import main

    stdin = io.StringIO("/system You explain Python.\nWhat does len do?\n/reset\nHello\n/quit\nnever read\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", "--workdir", str(trained_run[0]), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "(system prompt: 'You explain Python.')" in out and "(conversation reset)" in out
    assert out.count("assistant> ") == 2 and stdin.read() == "never read\n"


def test_feedback_purge_by_age_and_scrubbing(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    old = store.record_reply([user("call me on +44 20 7946 0958")], "ok", session_id="s1")
    store.rate(old, 1)
    store.edit(old, "write to a@b.example")
    stored = store.query("SELECT conversation, reply FROM replies")[0][0] + store.query("SELECT text FROM edits")[0][0]
    assert "7946" not in stored and "a@b.example" not in stored and "<PHONE>" in stored and "<EMAIL>" in stored
    assert store.purge(older_than=time.time() + 1) == 1
    assert store.query("SELECT COUNT(*) FROM ratings")[0][0] == store.query("SELECT COUNT(*) FROM edits")[0][0] == 0
    raw = FeedbackStore(tmp_path / "raw.sqlite", scrub=False)
    raw.record_reply([user("a@b.example")], "x")
    assert "a@b.example" in raw.query("SELECT conversation FROM replies")[0][0]


def test_a_bfloat16_run_decodes_in_float32_on_cpu(trained_run, tmp_path, capsys):
    """On a CPU the restored model computes in float32 whatever the run trained in, and says so."""
    import json
    import shutil

    from lmjax.run.restore import decode_dtype, restore_model
    from lmjax.run.workdir import open_workdir

    run = tmp_path / "bf16"
    shutil.copytree(trained_run[0], run, ignore=shutil.ignore_patterns("feedback.sqlite*"))
    config = json.loads((run / "config.json").read_text())
    config["model"]["dtype"] = "bfloat16"
    (run / "config.json").write_text(json.dumps(config))
    cfg = restore_model(open_workdir(run)).cfg
    assert cfg.model.dtype == "float32"
    assert "in float32 on cpu (it trained in bfloat16)" in capsys.readouterr().err
    restore_model(open_workdir(run))
    assert "it trained in" not in capsys.readouterr().err  # said once per process, not at every restore
    assert json.loads((run / "config.json").read_text())["model"]["dtype"] == "bfloat16"  # the run is untouched
    assert decode_dtype("bfloat16", "gpu") == "bfloat16" and decode_dtype("bfloat16", "tpu") == "bfloat16"
