"""The CPU image: built from the repo's Dockerfile with buildah on a debootstrap base and answering a chat
completion from inside its own root filesystem (tools/container_smoke.sh). Skipped only where buildah and
debootstrap cannot be installed."""

import subprocess
from pathlib import Path

import pytest
from conftest import xla_cache_env

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_image_serves_a_chat_completion():
    proc = subprocess.run(["bash", str(ROOT / "tools" / "container_smoke.sh")], cwd=ROOT, env=xla_cache_env(),
                          capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    if proc.returncode == 0 and "SKIP:" in proc.stdout:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and "PASS: the image serves a chat completion" in proc.stdout, output[-4000:]
