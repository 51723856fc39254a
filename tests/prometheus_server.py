"""A Prometheus server in a subprocess for the monitoring tests: it starts on a free loopback port with the given
configuration, polls, queries its HTTP API and stops. Debian's binary is at `PROMETHEUS`."""

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

PROMETHEUS = Path("/usr/bin/prometheus")


def free_port() -> int:
    """A loopback port that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """Prometheus with configuration `config` (a prometheus.yml as a dict), its data and log in `workdir`."""

    def __init__(self, config: dict, workdir: Path):
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={self.url.removeprefix('http://')}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=workdir)

    def wait_for(self, what: str, probe, timeout: float = 30):
        """Polls `probe()` every 0.25 s until it returns something other than None, which it returns; fails
        the test with Prometheus's log after `timeout` seconds, or at once if Prometheus exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                found = probe()
            except httpx.TransportError:
                found = None
            if found is not None:
                return found
            time.sleep(0.25)
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}; Prometheus's log:\n{self.log.read_text()}")

    def wait_ready(self, timeout: float = 30) -> "PrometheusServer":
        self.wait_for("Prometheus to start",
                      lambda: True if httpx.get(f"{self.url}/-/ready").status_code == 200 else None, timeout)
        return self

    def api(self, path: str, **params) -> dict:
        """The `data` of a successful API reply."""
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params).json()
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
