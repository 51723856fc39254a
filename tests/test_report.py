"""The report card: built from a trained run with feedback, every section present, and rendered by Chromium with
its plots loaded."""

import shutil

import pytest
from test_browser import CHROMIUM, browser  # noqa: F401  (the fixture)

from lmjax.cli import main
from lmjax.serve.feedback import FeedbackStore

SECTIONS = ["## Summary", "## Data", "## Training", "## Language modelling", "## Tasks", "## Chat", "## Bias",
            "## Red-team", "## Safety tuning", "## Feedback", "## Model card", "## Environment"]


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    from lmjax.report.card import build_report

    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_run[0], run)
    store = FeedbackStore.for_workdir(run)
    for value in (1, 1, -1):
        store.rate(store.record_reply([{"role": "user", "content": "What is len?"}], "It counts."), value)
    store.close()
    return build_report(run, limits={"lm_docs": 8, "tasks": 8, "chat": 8, "safety_phrasings": 1})


def test_report_has_every_section_and_plot(report):
    text = report.read_text()
    for section in SECTIONS:
        assert section in text, section
    assert "3 rated (2 up, 1 down)" in text and "`stdlib`: PSF-2.0" in text
    for png in ("loss.png", "bias.png", "ratings.png"):
        assert (report.parent / png).stat().st_size > 1000 and f"({png})" in text
    assert "<table>" in report.with_suffix(".html").read_text()


def test_cli_writes_the_report(trained_run, tmp_path, capsys, monkeypatch):
    import lmjax.report.card as card

    monkeypatch.setattr(card, "LIMITS", {"lm_docs": 4, "tasks": 4, "chat": 4, "safety_phrasings": 1})
    assert main(["report", "--workdir", str(trained_run[0]), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and "wrote" in capsys.readouterr().out


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_chromium(report, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(report.with_suffix(".html").as_uri())
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 3
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
               for i in images)
    assert len(browser.find_elements(By.TAG_NAME, "table")) == 7  # summary, lm, tasks, chat, bias, red-team, safety
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Report card")
