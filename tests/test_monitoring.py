"""The monitoring deployment (deploy/monitoring, compose.yaml) against the real server: promtool accepts the
Prometheus config and rules and the alerts fire on synthetic series as intended, every metric that a rule or a
dashboard panel names is one that `lmjax serve` exports, a real Prometheus with the repository's rules scrapes
the session's API server under a short load and every recording rule yields a series, and the Grafana and
compose files hang together (mounted paths, provisioning, the server's command line)."""

import json
import math
import re
import shlex
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from conftest import API_KEYS
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import PROMETHEUS, PrometheusServer

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RECORDING_RULES = MONITORING / "rules" / "lmjax-recording.yml"
ALERT_RULES = MONITORING / "rules" / "lmjax-alerts.yml"
DATASOURCE = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = MONITORING / "grafana" / "provisioning" / "dashboards" / "lmjax.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "lmjax.json"
COMPOSE = REPO / "compose.yaml"
PROMTOOL = Path("/usr/bin/promtool")

NAME = re.compile(r"(?<![A-Za-z0-9_:])lmjax:[A-Za-z0-9_:]+")  # a metric or recording-rule name in PromQL
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Raw metrics the rules must cover (the list): latency histograms, token counters, outcomes, load, HTTP.
REQUIRED_RAW = {"lmjax:time_to_first_token_seconds_bucket", "lmjax:inter_token_latency_seconds_bucket",
                "lmjax:e2e_request_latency_seconds_bucket", "lmjax:generation_tokens_total",
                "lmjax:prompt_tokens_total", "lmjax:request_success_total", "lmjax:num_requests_waiting",
                "lmjax:num_requests_running", "lmjax:kv_cache_usage_perc", "lmjax:http_requests_total"}
ALERTS = {"LmjaxDown", "LmjaxHighTTFT", "LmjaxQueueGrowing", "LmjaxHighErrorRate", "LmjaxKVCacheFull"}
ALICE = {"Authorization": f"Bearer {API_KEYS['alice'][0]}"}

needs_promtool = pytest.mark.skipif(not PROMTOOL.is_file(), reason=f"{PROMTOOL} is missing (`make prometheus`)")
needs_prometheus = pytest.mark.skipif(not PROMETHEUS.is_file(), reason=f"{PROMETHEUS} is missing (`make prometheus`)")


def _load(path: Path):
    """A YAML file, parsed."""
    return yaml.safe_load(path.read_text())


def _rules(path: Path) -> list[dict]:
    """Every rule (recording or alerting) of a rule file."""
    return [rule for group in _load(path)["groups"] for rule in group["rules"]]


def _recorded() -> list[str]:
    """The names that the recording rules define."""
    return [rule["record"] for rule in _rules(RECORDING_RULES)]


def _dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template-variable queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return exprs + [variable["definition"] for variable in dashboard["templating"]["list"]]


def _promtool(*args: str, cwd: Path = REPO) -> str:
    """promtool's output; fails the test with it when promtool exits non-zero."""
    done = subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


@needs_promtool
def test_promtool_checks_config_and_rules():
    """`promtool check config` loads the config and, through it, both rule files (resolved relative to the
    config); `promtool check rules` accepts each rule file on its own."""
    output = _promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO)))
    assert "2 rule files found" in output, output
    for path, rules in ((RECORDING_RULES, _recorded()), (ALERT_RULES, ALERTS)):
        output = _promtool("check", "rules", str(path.relative_to(REPO)))
        assert f"SUCCESS: {len(rules)} rules found" in output, output
    assert {rule["alert"] for rule in _rules(ALERT_RULES)} == ALERTS
    for rule in _rules(ALERT_RULES):
        assert rule.get("for") and rule["labels"]["severity"] in {"warning", "critical"}, rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


# promtool unit tests of the alerts: synthetic series at 15 s steps ("a+bxn": n steps from a, adding b each).
# TTFT: per step, 1 request under 1 s and 9 in (1 s, 2.5 s], so the p95 interpolates to ~2.4 s (> 2 s).
_SLOW = {"1.0": "0+1x60", "2.5": "0+10x60", "+Inf": "0+10x60"}
_FAST = {"1.0": "0+10x60", "2.5": "0+10x60", "+Inf": "0+10x60"}
ALERT_TESTS = [
    {"interval": "15s",
     "input_series": [
         {"series": 'up{job="lmjax", instance="lmjax:8000"}', "values": "1 1 1 1 0x20"},
         *({"series": f'lmjax:time_to_first_token_seconds_bucket{{model_name="{model}", le="{le}"}}',
            "values": values} for model, buckets in (("slow", _SLOW), ("fast", _FAST))
           for le, values in buckets.items()),
         # 10 % of "bad"'s API requests fail with 503 (its scrapes, if they counted, would dilute that to 1.7 %)
         # and 10 % of "ok"'s with 401, a client error.
         {"series": 'lmjax:http_requests_total{model_name="bad", handler="/v1/completions", method="POST", '
                    'status="200"}', "values": "0+18x60"},
         {"series": 'lmjax:http_requests_total{model_name="bad", handler="/v1/completions", method="POST", '
                    'status="503"}', "values": "0+2x60"},
         {"series": 'lmjax:http_requests_total{model_name="bad", handler="/metrics", method="GET", '
                    'status="200"}', "values": "0+100x60"},
         {"series": 'lmjax:http_requests_total{model_name="ok", handler="/v1/completions", method="POST", '
                    'status="200"}', "values": "0+9x60"},
         {"series": 'lmjax:http_requests_total{model_name="ok", handler="/v1/completions", method="POST", '
                    'status="401"}', "values": "0+1x60"},
         # A queue that grows past 5 and stays there, one that drains from 40, and one stuck at 5.
         {"series": 'lmjax:num_requests_waiting{model_name="growing"}', "values": "0+1x60"},
         {"series": 'lmjax:num_requests_waiting{model_name="draining"}', "values": "40-0.5x60"},
         {"series": 'lmjax:num_requests_waiting{model_name="at_limit"}', "values": "5x60"},
         {"series": 'lmjax:kv_cache_usage_perc{model_name="full"}', "values": "0.97x60"},
         {"series": 'lmjax:kv_cache_usage_perc{model_name="busy"}', "values": "0.9x60"},
     ],
     "alert_rule_test": [
         # Down for 45 s: not yet 1m. Down since 1 min: firing.
         {"eval_time": "105s", "alertname": "LmjaxDown", "exp_alerts": []},
         {"eval_time": "2m", "alertname": "LmjaxDown", "exp_alerts": [
             {"exp_labels": {"severity": "critical", "job": "lmjax", "instance": "lmjax:8000"}}]},
         {"eval_time": "4m", "alertname": "LmjaxHighTTFT", "exp_alerts": []},
         {"eval_time": "10m", "alertname": "LmjaxHighTTFT", "exp_alerts": [
             {"exp_labels": {"severity": "warning", "model_name": "slow"}}]},
         {"eval_time": "10m", "alertname": "LmjaxHighErrorRate", "exp_alerts": [
             {"exp_labels": {"severity": "critical", "model_name": "bad"}}]},
         {"eval_time": "14m", "alertname": "LmjaxQueueGrowing", "exp_alerts": [
             {"exp_labels": {"severity": "warning", "model_name": "growing"}}]},
         {"eval_time": "10m", "alertname": "LmjaxKVCacheFull", "exp_alerts": [
             {"exp_labels": {"severity": "warning", "model_name": "full"}}]},
     ]},
]


@needs_promtool
def test_alerts_fire_on_synthetic_series(tmp_path):
    """`promtool test rules` on the repository's rules: each alert fires on a series that breaks its threshold for
    its `for` duration, and not on one just inside it (exact firing sets: an extra alert fails the test). The
    annotations are left out of the copy tested here (promtool would compare their rendered text); `promtool
    check rules` has parsed their templates."""
    alerts = _load(ALERT_RULES)
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alerts))
    tests = {"rule_files": [str(RECORDING_RULES), "alerts.yml"], "evaluation_interval": "15s", "tests": ALERT_TESTS}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert "SUCCESS" in _promtool("test", "rules", "tests.yml", cwd=tmp_path)


def _exported(metrics_text: str) -> set[str]:
    """The names that a scrape of `metrics_text` gives series of: gauges as they are, counters with `_total`,
    histograms with `_bucket`, `_sum` and `_count` (also those without samples yet: labelled children
    are created on first use)."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        if family.type == "counter":
            names.add(family.name if family.name.endswith("_total") else f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(family.name)
    return names


def test_every_referenced_metric_exists(api_server):
    """Every `lmjax:` name in a recording rule, an alert or a dashboard expression is exported by the live
    server or defined by a recording rule, and the rules cover every raw metric the deployment promised."""
    server, _ = api_server
    exported = _exported(httpx.get(f"{server.url}/metrics").text)
    assert {"lmjax:time_to_first_token_seconds_bucket", "lmjax:http_requests_total"} <= exported, exported
    recorded = _recorded()
    assert len(recorded) == len(set(recorded)), recorded
    assert not set(recorded) & exported, "a recording rule shadows an exported metric"
    sources = {f"{RECORDING_RULES.name}: {rule['record']}": rule["expr"] for rule in _rules(RECORDING_RULES)}
    sources |= {f"{ALERT_RULES.name}: {rule['alert']}": rule["expr"] for rule in _rules(ALERT_RULES)}
    sources |= {f"{DASHBOARD.name}: {expr}": expr for expr in _dashboard_exprs()}
    referenced, unknown = set(), []
    for where, expr in sources.items():
        names = set(NAME.findall(expr))
        referenced |= names
        unknown += [f"{where} names {name}" for name in sorted(names - exported - set(recorded))]
    assert not unknown, "\n".join(unknown)
    assert not REQUIRED_RAW - referenced, f"raw metrics that no rule uses: {REQUIRED_RAW - referenced}"
    assert set(recorded) <= referenced, "recording rules that no alert or panel uses: " \
        f"{set(recorded) - referenced}"


def _prometheus_config(target: str) -> dict:
    """deploy/monitoring/prometheus.yml retargeted at one host:port, scraping and evaluating every second, with
    the repository's rule files (by absolute path)."""
    config = _load(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / path).resolve()) for path in config["rule_files"]]
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    static["targets"] = [target]
    return config


@pytest.fixture
def prometheus(api_server, tmp_path):
    """A Prometheus with the repository's config and rules scraping the session's API server."""
    server, _ = api_server
    instance = PrometheusServer(_prometheus_config(urlsplit(server.url).netloc), tmp_path)
    try:
        yield instance.wait_ready()
    finally:
        instance.stop()


def _load_test(url: str) -> tuple[list[dict], int]:
    """A short load: completions and streamed chat completions with alice's key, and one request with a wrong
    key (a 401). Returns the choices of the successful replies (of streams: the chunks with a finish reason)
    and the most tokens a completion generated."""
    choices, generated = [], 0
    with httpx.Client(base_url=url, headers=ALICE, timeout=120) as client:
        for i in range(3):
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": f"The {i}", "max_tokens": 8,
                                                         "temperature": 0})
            assert reply.status_code == 200, reply.text
            choices += reply.json()["choices"]
            generated = max(generated, reply.json()["usage"]["completion_tokens"])
        for i in range(2):
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 8,
                    "stream": True, "seed": i}
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                assert reply.status_code == 200, reply.read()
                events = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", events
            choices += [choice for event in events[:-1] for choice in json.loads(event)["choices"]
                        if choice.get("finish_reason")]
        wrong_key = client.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 1},
                                headers={"Authorization": "Bearer sk-not-a-key-0123456789"})
        assert wrong_key.status_code == 401, wrong_key.text
    return choices, generated


def _values(result: list[dict]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


@needs_prometheus
def test_prometheus_evaluates_every_rule(api_server, prometheus):
    """A real Prometheus with the repository's rules scrapes the server during a short load, and then every
    recording rule has a series for the model, every rule evaluates without error, no alert fires, and every
    dashboard expression is valid PromQL with data.

    Decision on NaN: a rule passes when its series exists. The latency quantiles are NaN over a window that
    saw no new observation, which is correct ("no data"); here the load arrives after the first scrape, so
    the quantiles of TTFT, end-to-end and queue time must also be finite and within the buckets, and so must
    the inter-token latency's when some request generated two tokens or more."""
    server, _ = api_server
    count = 'lmjax:time_to_first_token_seconds_count{model_name="tiny"}'

    def scraped(at_least: float):
        """Waits for a scrape in which the TTFT count is `at_least`."""
        return prometheus.wait_for(f"a scrape with {count} >= {at_least:g}", lambda: next(
            (v for v in _values(prometheus.query(count)) if v >= at_least), None))

    # The server creates a labelled counter's series (a finish reason, an HTTP status) at its first increment,
    # and rate() cannot see a series' first value: a warm-up round creates them before the measured round.
    _load_test(server.url)
    served = [s for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
              for s in f.samples if s.name == "lmjax:time_to_first_token_seconds_count"]
    before = scraped(served[0].value)
    choices, generated = _load_test(server.url)
    assert choices and all(choice["finish_reason"] for choice in choices), choices
    scraped(before + len(choices))

    recorded = _recorded()

    def missing() -> list[str]:
        return [name for name in recorded if not prometheus.query(f'{name}{{model_name="tiny"}}')]

    deadline = time.monotonic() + 30
    while (absent := missing()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not absent, f"recording rules without a series after 30 s: {absent}\n{prometheus.log.read_text()}"
    # Two more evaluations, so that the rates and ratios include the last requests' scrape.
    time.sleep(2.5)
    by_label = {"lmjax:request_success:rate_5m", "lmjax:http_requests:rate_5m"}  # a series per reason / status
    value = {name: _values(prometheus.query(f'{name}{{model_name="tiny"}}')) for name in recorded}
    assert {name for name, values in value.items() if len(values) != 1} <= by_label, value
    value = {name: values if name in by_label else values[0] for name, values in value.items()}

    latency = [name for name in recorded if name.endswith(("p50_5m", "p95_5m", "p99_5m"))]
    assert len(latency) >= 9, latency
    for name in latency:
        if "inter_token" in name and generated < 2 and math.isnan(value[name]):
            continue
        assert math.isfinite(value[name]) and 0 <= value[name] <= 80, (name, value[name])
    for name in ("lmjax:generation_tokens:rate_5m", "lmjax:prompt_tokens:rate_5m"):
        assert value[name] > 0, (name, value[name])
    reasons = {sample["metric"]["finished_reason"]: float(sample["value"][1])
               for sample in prometheus.query('lmjax:request_success:rate_5m{model_name="tiny"}')}
    assert {choice["finish_reason"] for choice in choices} <= set(reasons), (reasons, choices)
    assert value["lmjax:http_requests:ratio_5xx_5m"] == 0, value
    assert 0 < value["lmjax:http_requests:ratio_4xx_5m"] < 0.5, value  # 1 wrong key in 6 API requests a round
    assert value["lmjax:num_requests_waiting:sum"] == 0 and value["lmjax:num_requests_running:sum"] >= 0, value
    assert 0 <= value["lmjax:kv_cache_usage_perc:max"] <= 1, value

    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(recorded) | ALERTS
    broken = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not broken, broken
    firing = [alert for alert in prometheus.api("alerts")["alerts"] if alert["state"] != "inactive"]
    assert not firing, firing

    for expr in _dashboard_exprs():
        if expr.startswith("label_values("):  # Grafana's template-variable function, not PromQL
            metric, label = re.fullmatch(r"label_values\((\S+), (\w+)\)", expr).groups()
            assert "tiny" in prometheus.api(f"label/{label}/values", **{"match[]": metric}), expr
            continue
        promql = expr.replace("$model_name", ".*").replace("$__rate_interval", "1m")
        assert prometheus.query(promql), f"no data for the dashboard expression {expr}"


def test_grafana_dashboard_and_provisioning():
    """The dashboard parses, has unique panel ids and non-overlapping panels on Grafana's 24-column grid, queries
    the provisioned datasource (uid `prometheus`) in every panel and target, and filters by a `model_name`
    variable; the providers point where compose.yaml mounts the dashboards."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and 36 <= dashboard["schemaVersion"] <= 41
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), ids
    cells = {}
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["type"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "prometheus", target
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model_name"]
    assert variable["datasource"]["uid"] == "prometheus"
    assert variable["definition"] == "label_values(lmjax:num_requests_running, model_name)"
    filtered = [target["expr"] for panel in panels for target in panel["targets"] if "lmjax:" in target["expr"]]
    assert all('model_name=~"$model_name"' in expr for expr in filtered), filtered

    (datasource,) = _load(DATASOURCE)["datasources"]
    assert datasource["uid"] == "prometheus" and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = _load(DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    mounts = dict(_bind_mounts(_load(COMPOSE)["services"]["grafana"]))
    assert mounts[DASHBOARD.parent] == provider["options"]["path"], mounts
    assert mounts[DATASOURCE.parents[1]] == "/etc/grafana/provisioning", mounts


def _bind_mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts in compose's short syntax; named volumes left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((REPO / source).resolve(), target))
    return mounts


def test_compose_file():
    """compose.yaml names the four services; every bind mount from deploy/ exists, named volumes are declared;
    Prometheus gets the config with its rules beside it and scrapes the lmjax service's port; the keys secret
    has its example; and the commands of the server and the demo parse with `lmjax`'s own parser, the server's
    with API keys (it refuses 0.0.0.0 without)."""
    from lmjax.cli import build_parser
    from lmjax.serve.auth import read_keys

    compose = _load(COMPOSE)
    services = compose["services"]
    assert set(services) == {"lmjax", "demo", "prometheus", "grafana"}
    for name, service in services.items():
        for host, _ in _bind_mounts(service):
            if host.is_relative_to(REPO / "deploy"):
                assert host.exists(), f"{name} mounts {host}, which is missing"
        named = [v.split(":")[0] for v in service.get("volumes", []) if not v.startswith((".", "/"))]
        assert set(named) <= set(compose.get("volumes") or {}), (name, named)

    mounts = dict(_bind_mounts(services["prometheus"]))
    config_target = mounts[PROMETHEUS_CONFIG]
    assert f"--config.file={config_target}" in services["prometheus"]["command"]
    for rule_file in _load(PROMETHEUS_CONFIG)["rule_files"]:
        container_dir = mounts[(PROMETHEUS_CONFIG.parent / rule_file).parent.resolve()]
        assert str(Path(config_target).parent / rule_file) == f"{container_dir}/{Path(rule_file).name}", rule_file
    (job,) = _load(PROMETHEUS_CONFIG)["scrape_configs"]
    assert job["job_name"] == "lmjax" and job["metrics_path"] == "/metrics"

    lmjax = services["lmjax"]
    assert lmjax["build"]["context"] == "." and lmjax["build"]["args"]["TARGET"] == "cpu"
    assert lmjax["image"] == services["demo"]["image"] == "lmjax:cpu"
    args = build_parser().parse_args(lmjax["command"])
    assert args.func.__name__ == "cmd_serve" and args.host == "0.0.0.0" and args.workdir == "/runs/model"
    assert job["static_configs"][0]["targets"] == [f"lmjax:{args.port}"]
    assert any(port.split(":")[-1] == str(args.port) for port in lmjax["ports"])
    assert any(mount.split(":")[1] == args.workdir and not mount.endswith(":ro") for mount in lmjax["volumes"])
    assert "/health" in " ".join(lmjax["healthcheck"]["test"]) and f":{args.port}/" in " ".join(
        lmjax["healthcheck"]["test"])
    (secret,) = lmjax["secrets"]
    assert args.api_keys == f"/run/secrets/{secret}"
    keys_file = REPO / compose["secrets"][secret]["file"]
    example = keys_file.with_name(keys_file.name.replace(".toml", ".example.toml"))
    assert example.is_file() and read_keys(example), example

    demo_command = services["demo"]["command"]
    demo = build_parser().parse_args(demo_command if isinstance(demo_command, list) else shlex.split(demo_command))
    assert demo.func.__name__ == "cmd_demo" and demo.workdir == args.workdir
    assert any(port.split(":")[-1] == str(demo.port) for port in services["demo"]["ports"])

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG TARGET\b", dockerfile, re.M), "the Dockerfile takes no TARGET build argument"
    assert re.search(r'^ENTRYPOINT \["lmjax"\]', dockerfile, re.M), "compose's commands assume `lmjax` runs them"
