"""`lmjax serve`'s /metrics as a real Prometheus sees it: scraped by Debian's `prometheus` (installed by `make
test`) and queried with PromQL, and linted by its `promtool`."""

import math
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import API_KEYS
from prometheus_server import PROMETHEUS, PrometheusServer

PROMTOOL = Path("/usr/bin/promtool")
TTFT = 'lmjax:time_to_first_token_seconds_count{model_name="tiny"}'
TTFT_MEDIAN = "histogram_quantile(0.5, sum by (le) (rate(lmjax:time_to_first_token_seconds_bucket[1m])))"
REQUESTS = 3  # completions made while Prometheus watches


def _target_health(prometheus: PrometheusServer) -> str | None:
    """The health ('up', 'down', 'unknown') of the one target, once it has been scraped; else None."""
    targets = prometheus.api("targets")["activeTargets"]
    return targets[0]["health"] if targets and targets[0]["lastScrape"] != "0001-01-01T00:00:00Z" else None


@pytest.fixture
def prometheus(api_server, tmp_path):
    """A Prometheus scraping the session's API server, stopped after the test."""
    server, _ = api_server
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "lmjax", "metrics_path": "/metrics",
                                  "static_configs": [{"targets": [urlsplit(server.url).netloc]}]}]}
    instance = PrometheusServer(config, tmp_path)
    try:
        yield instance.wait_ready()
    finally:
        instance.stop()


def _count(prometheus: PrometheusServer) -> float | None:
    """The TTFT histogram's count as Prometheus last scraped it; None before it has a sample."""
    result = prometheus.query(TTFT)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(not PROMETHEUS.is_file(), reason=f"{PROMETHEUS} is missing (`make prometheus` installs it)")
def test_prometheus_scrapes_time_to_first_token(api_server, prometheus):
    """Prometheus scrapes the server, sees the TTFT histogram count every completion made after its first
    scrape, and PromQL's median over the histogram's rate is a finite latency."""
    server, _ = api_server
    # A first scrape before the requests, so that the rate over the window sees them arrive.
    assert prometheus.wait_for("the first scrape", lambda: _target_health(prometheus)) == "up"
    before = prometheus.wait_for("a TTFT sample", lambda: _count(prometheus))
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

    assert prometheus.wait_for(f"the count to grow by {REQUESTS}", grown) >= REQUESTS

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
