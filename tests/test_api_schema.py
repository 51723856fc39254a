"""Property-based testing of `lmjax serve` from its own OpenAPI schema: schemathesis (its CLI) sends valid and
invalid requests to every operation, with alice's key, and no response may be a server error (5xx)."""

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
from conftest import API_KEYS

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Test cases per operation and phase: with the coverage phase's boundary cases, ~750 requests in all (~270 of
# them generate, up to the 64-token context), ~15 s here.
MAX_EXAMPLES = 15
SEED = 20240611  # the same requests every run


def test_no_server_errors_from_the_openapi_schema(api_server, tmp_path):
    """schemathesis tests every operation of /openapi.json (its JUnit report names them all) and finds no 5xx."""
    server, _ = api_server
    schema = httpx.get(f"{server.url}/openapi.json").json()
    operations = {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= operations, sorted(operations)
    junit = tmp_path / "junit.xml"
    command = [
        str(SCHEMATHESIS), "run", f"{server.url}/openapi.json",
        "--header", f"Authorization: Bearer {API_KEYS['alice'][0]}",
        "--checks", "not_a_server_error",
        # No stateful phase: the schema has no links, and nothing here depends on earlier responses.
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
        # Hypothesis times its own data generation: not this test's concern, and slow on a busy machine.
        "--suppress-health-check", "too_slow",
        "--generation-database", "none", "--request-timeout", "120", "--no-color",
        "--report", "junit", "--report-junit-path", str(junit),
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output

    cases = list(ET.parse(junit).getroot().iter("testcase"))
    assert {case.get("name") for case in cases} == operations, output  # every operation was tested
    failed = [case.get("name") for case in cases if case.find("failure") is not None or case.find("error") is not None]
    assert not failed, output
