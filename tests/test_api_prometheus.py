"""`lmjax serve`'s /metrics as a real Prometheus sees it: scraped by Debian's `prometheus` (installed by `make
test`) and queried with PromQL, and linted by its `promtool`."""

import math
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import API_KEYS

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
TTFT = 'lmjax:time_to_first_token_seconds_count{model_name="tiny"}'
TTFT_MEDIAN = "histogram_quantile(0.5, sum by (le) (rate(lmjax:time_to_first_token_seconds_bucket[1m])))"
REQUESTS = 3  # completions made while Prometheus watches


def _free_port() -> int:
    """A loopback port that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, probe, timeout: float, log: Path):
    """Polls `probe()` every 0.25 s until it returns something other than None, which it returns; fails the
    test with Prometheus's log after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = probe()
        except httpx.TransportError:
            found = None
        if found is not None:
            return found
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}; Prometheus's log:\n{log.read_text()}")


class Prometheus:
    """A Prometheus server in a subprocess that scrapes one target every second; `query` runs PromQL."""

    def __init__(self, target: str, workdir: Path):
        self.log = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          "scrape_configs:\n  - job_name: lmjax\n    metrics_path: /metrics\n"
                          f"    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{_free_port()}"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={urlsplit(self.url).netloc}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)

    def wait_ready(self, timeout: float = 30) -> "Prometheus":
        def ready():
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
            return True if httpx.get(f"{self.url}/-/ready").status_code == 200 else None

        _wait_for("Prometheus to start", ready, timeout, self.log)
        return self

    def target_health(self) -> str | None:
        """The health ('up', 'down', 'unknown') of the one target, once it has been scraped; else None."""
        targets = httpx.get(f"{self.url}/api/v1/targets").json()["data"]["activeTargets"]
        return targets[0]["health"] if targets and targets[0]["lastScrape"] != "0001-01-01T00:00:00Z" else None

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}).json()
        assert reply["status"] == "success", reply
        assert reply["data"]["resultType"] == "vector", reply
        return reply["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def prometheus(api_server, tmp_path):
    """A Prometheus scraping the session's API server, stopped after the test."""
    server, _ = api_server
    instance = Prometheus(urlsplit(server.url).netloc, tmp_path)
    try:
        yield instance.wait_ready()
    finally:
        instance.stop()


def _count(prometheus: Prometheus) -> float | None:
    """The TTFT histogram's count as Prometheus last scraped it; None before it has a sample."""
    result = prometheus.query(TTFT)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(not PROMETHEUS.is_file(), reason=f"{PROMETHEUS} is missing (`make prometheus` installs it)")
def test_prometheus_scrapes_time_to_first_token(api_server, prometheus):
    """Prometheus scrapes the server, sees the TTFT histogram count every completion made after its first
    scrape, and PromQL's median over the histogram's rate is a finite latency."""
    server, _ = api_server
    # A first scrape before the requests, so that the rate over the window sees them arrive.
    assert _wait_for("the first scrape", prometheus.target_health, 30, prometheus.log) == "up"
    before = _wait_for("a TTFT sample", lambda: _count(prometheus), 30, prometheus.log)
    headers = {"Authorization": f"Bearer {API_KEYS['alice'][0]}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
        for i in range(REQUESTS):
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": f"The {i}", "max_tokens": 4,
                                                         "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] >= 1, reply.text

    def grown() -> float | None:
        count = _count(prometheus)
        return count if count is not None and count >= before + REQUESTS else None

    assert _wait_for(f"the count to grow by {REQUESTS}", grown, 30, prometheus.log) >= REQUESTS

    result = prometheus.query(TTFT_MEDIAN)
    assert len(result) == 1, result
    median = float(result[0]["value"][1])
    assert math.isfinite(median) and 0 < median <= 80, result  # within the histogram's buckets (metrics.py)


@pytest.mark.skipif(not PROMTOOL.is_file(), reason=f"{PROMTOOL} is missing (`make prometheus` installs it)")
def test_promtool_lints_metrics(api_server):
    """promtool's linter finds nothing in /metrics but the colons of vLLM's `prefix:` names, which
    Prometheus's conventions reserve for recording rules (they are valid names)."""
    server, _ = api_server
    text = httpx.get(f"{server.url}/metrics").text
    assert "lmjax:time_to_first_token_seconds_bucket" in text
    lint = subprocess.run([str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=30)
    problems = [line for line in (lint.stdout + lint.stderr).splitlines() if line.strip()]
    unexpected = [line for line in problems if "should not contain ':'" not in line]
    assert not unexpected, "\n".join(problems)
