"""The chat demo in headless Chromium: ask, watch the reply stream in, vote, find the vote in SQLite.

Needs Debian's `chromium` and `chromium-driver` (apt); never downloads a browser.
"""

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lmjax.serve.engine import ChatEngine
from lmjax.serve.feedback import FeedbackStore
from lmjax.serve.safety import ContentFilter
from lmjax.text.blocklist import Blocklist

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium: apt-get install chromium "
                                                             "chromium-driver")


def wait_for(condition: Callable, timeout: float = 30.0, what: str = "condition"):
    """The first truthy value of `condition()` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # elements come and go while Gradio re-renders
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    from lmjax.serve.demo import launch

    engine = ChatEngine.from_workdir(trained_run[0])
    engine.warmup()
    store = FeedbackStore(tmp_path_factory.mktemp("browser") / "feedback.sqlite")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(engine, store, ContentFilter(Blocklist.default(), store), port=port, block=False)
    yield f"http://127.0.0.1:{port}/", store
    demo.close()


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver_path = CHROMEDRIVER if CHROMEDRIVER.exists() else shutil.which("chromedriver")
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    yield driver
    driver.quit()


def test_ask_stream_and_vote_in_browser(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, store = served
    browser.get(url)
    box = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#message textarea"), what="the message box")
    box.send_keys("What is len?", Keys.ENTER)
    bot = lambda: browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")
    seen = []
    deadline = time.monotonic() + 60
    while not store.query("SELECT id FROM replies") and time.monotonic() < deadline:
        texts = [b.text for b in bot()] if bot() else []
        if texts and (not seen or seen[-1] != texts[-1]):
            seen.append(texts[-1])
        time.sleep(0.02)
    (reply_id, reply), = store.query("SELECT id, reply FROM replies")
    whole = " ".join(reply.split())

    def shown() -> bool:  # keeps collecting what the page shows: a slow page may render only after the store
        texts = [b.text for b in bot()]
        if texts and (not seen or seen[-1] != texts[-1]):
            seen.append(texts[-1])
        return bool(texts) and " ".join(texts[-1].split()) == whole

    wait_for(shown, what="the whole reply shown")
    assert all(whole.startswith(" ".join(s.split())) for s in seen), seen  # the reply only ever grew
    like = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#chatbot button[aria-label='Like']"),
                    what="the thumbs-up button")
    like.click()
    assert wait_for(lambda: store.query("SELECT reply_id, value FROM ratings"), what="the rating row") == \
        [(reply_id, 1)]
    if os.environ.get("LMJAX_SCREENSHOT"):
        browser.save_screenshot(os.environ["LMJAX_SCREENSHOT"])
