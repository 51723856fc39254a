"""The Kubernetes manifests in deploy/k8s: every overlay renders with `kubectl kustomize`, holds the objects a
deployment needs, wires them together consistently, validates against the Kubernetes API schemas, and starts
`lmjax serve` with arguments the real CLI accepts. Also the two scripts: the init container's run-directory sync
(base/sync_run.py) and the merge of the replicas' feedback databases (merge_feedback.py).

No cluster is needed: kubectl only renders. Skipped when kubectl is not installed.
"""

import importlib.util
import os
import re
import shutil
import sqlite3
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from lmjax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# The first release where everything the manifests use is GA (StatefulSet persistentVolumeClaimRetentionPolicy)
# and the newest whose schemas kubernetes-validate>=1.37 ships.
K8S_VERSIONS = ("1.32", "1.37")
NAMESPACE = "lmjax"
WORKLOAD = ("StatefulSet", "lmjax")
CRDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "ScaledObject": "keda.sh/v1alpha1"}

# name -> (overlay, components, expected image tag, expected --slots, uses KEDA)
TARGETS = {
    "cpu": ("overlays/cpu", [], "cpu", 16, False),
    "gpu": ("overlays/gpu", [], "cuda", 64, False),
    "tpu": ("overlays/tpu", [], "tpu", 64, False),
    "cpu+keda": ("overlays/cpu", ["components/keda"], "cpu", 16, True),
    "gpu+keda+ttft": ("overlays/gpu", ["components/keda", "components/keda-ttft"], "cuda", 64, True),
}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def _kustomize(directory: Path) -> list[dict]:
    """The documents `kubectl kustomize directory` renders (fails the test on a kustomize error)."""
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every target rendered once. A target with components is an overlay of its own in a temporary directory,
    which is how a user enables them (kustomize wants relative paths)."""
    out = {}
    for name, (overlay, components, *_) in TARGETS.items():
        if not components:
            out[name] = _kustomize(K8S / overlay)
            continue
        directory = tmp_path_factory.mktemp(name.replace("+", "-"))
        rel = lambda p, d=directory: Path(os.path.relpath(K8S / p, d)).as_posix()
        (directory / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel(overlay)], "components": [rel(c) for c in components]}))
        out[name] = _kustomize(directory)
    return out


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    """The single document of `kind` (and `name`)."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(docs: list[dict]) -> dict:
    return _one(docs, *WORKLOAD)["spec"]["template"]


def _server(docs: list[dict]) -> dict:
    return next(c for c in _pod(docs)["spec"]["containers"] if c["name"] == "lmjax")


def _port(container: dict, port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container port number it reaches."""
    numbers = {p["name"]: p["containerPort"] for p in container["ports"]}
    number = numbers[port] if isinstance(port, str) else port
    assert number in numbers.values(), f"port {port} is not a port of container {container['name']}"
    return number


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores, bytes or a count)."""
    units = {"m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


@pytest.mark.parametrize("target", TARGETS)
def test_objects_and_one_autoscaler(rendered, target):
    """Workload, Services, PDB and ServiceMonitor are there; exactly one autoscaler (the HPA, or KEDA's
    ScaledObject with the HPA deleted) scales the StatefulSet; everything lives in the lmjax namespace."""
    docs, keda = rendered[target], TARGETS[target][4]
    kinds = [d["kind"] for d in docs]
    for kind in ("StatefulSet", "Service", "PodDisruptionBudget", "ServiceMonitor", "PersistentVolumeClaim"):
        assert kind in kinds, f"{target}: no {kind}"
    assert "Deployment" not in kinds and "Secret" not in kinds  # the keys Secret is created by hand
    assert _one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert _one(docs, "Service", "lmjax")["spec"]["ports"] == [
        {"name": "http", "port": 8000, "protocol": "TCP", "targetPort": "http"}]

    scalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert [d["kind"] for d in scalers] == (["ScaledObject"] if keda else ["HorizontalPodAutoscaler"])
    ref = scalers[0]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == WORKLOAD and ref.get("apiVersion", "apps/v1") == "apps/v1"
    if not keda:
        assert scalers[0]["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_and_ports_connect(rendered, target):
    """Selectors of the StatefulSet, Services, PDB and ServiceMonitor reach what they should, and only that."""
    docs = rendered[target]
    pod, server = _pod(docs), _server(docs)
    labels = pod["metadata"]["labels"]
    statefulset = _one(docs, *WORKLOAD)
    assert _matches(statefulset["spec"]["selector"]["matchLabels"], labels)
    assert _matches(_one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for service in services.values():
        assert _matches(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert _port(server, port["targetPort"]) == 8000
    governing = services[statefulset["spec"]["serviceName"]]
    assert governing["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"

    monitor = _one(docs, "ServiceMonitor")
    scraped = [s for s in services.values()
               if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in scraped] == ["lmjax"], "exactly the API Service is scraped"
    port_names = {p["name"] for p in scraped[0]["spec"]["ports"]}
    assert all(e["port"] in port_names for e in monitor["spec"]["endpoints"])

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert _port(server, int(annotations["prometheus.io/port"])) == 8000


@pytest.mark.parametrize("target", TARGETS)
def test_probes(rendered, target):
    """Startup and readiness wait for /health (503 until compiled) on the server's port, the startup probe
    allows minutes of compiling, and liveness does not use /health or the queue."""
    server = _server(rendered[target])
    for probe in ("startupProbe", "readinessProbe"):
        get = server[probe]["httpGet"]
        assert get["path"] == "/health" and _port(server, get["port"]) == 8000, probe
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "at least 10 minutes to compile"
    liveness = server["livenessProbe"]
    if "httpGet" in liveness:
        assert liveness["httpGet"]["path"] == "/metrics"
        port = liveness["httpGet"]["port"]
    else:
        port = liveness["tcpSocket"]["port"]
    assert _port(server, port) == 8000
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, "a busy server is not killed at once"


@pytest.mark.parametrize("target", TARGETS)
def test_server_args_parse_and_match_the_pod(rendered, target):
    """The container args are a valid `lmjax serve` command line (the image's entrypoint is `lmjax`) whose
    paths, port and slots agree with the pod's mounts, ports and the overlay's hardware."""
    docs = rendered[target]
    _, _, tag, slots, _ = TARGETS[target]
    pod, server = _pod(docs), _server(docs)
    assert "command" not in server, "the image's entrypoint `lmjax` must stay"
    args = build_parser().parse_args(server["args"])
    assert args.command == "serve" and args.func.__name__ == "cmd_serve"
    assert (args.host, args.slots, args.allow_unauthenticated) == ("0.0.0.0", slots, False)
    assert _port(server, args.port) == 8000

    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claims = {t["metadata"]["name"] for t in _one(docs, *WORKLOAD)["spec"]["volumeClaimTemplates"]}
    # The run directory is the replica's own claim and writable: the server writes feedback.sqlite there.
    run = mounts[args.workdir]
    assert run["name"] in claims and not run.get("readOnly", False)
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["JAX_COMPILATION_CACHE_DIR"].startswith(args.workdir + "/")
    # The keys file comes from the Secret, as the item the mount's directory holds.
    keys = Path(args.api_keys)
    secret = volumes[mounts[str(keys.parent)]["name"]]["secret"]
    assert secret["secretName"] == "lmjax-api-keys"
    assert {"key": "keys.toml", "path": keys.name} in secret["items"]

    for container in pod["spec"]["containers"] + pod["spec"]["initContainers"]:
        assert container["image"] == f"lmjax:{tag}", container["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_security_and_resources(rendered, target):
    """Non-root uid 1000, read-only root filesystems with a writable /tmp, requests within limits, and the
    accelerator each overlay asks for."""
    pod = _pod(rendered[target])
    spec = pod["spec"]
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000 and security["fsGroup"] == 1000
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"] + spec["initContainers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in volumes[tmp["name"]]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        for resource, amount in requests.items():
            if resource in limits:
                assert _quantity(amount) <= _quantity(limits[resource]), f"{container['name']} {resource}"
        assert "memory" in limits, f"{container['name']} has no memory limit"

    limits = _server(rendered[target])["resources"]["limits"]
    overlay = TARGETS[target][0]
    accelerators = {k for k in limits if k in ("nvidia.com/gpu", "google.com/tpu")}
    if overlay.endswith("gpu"):
        assert accelerators == {"nvidia.com/gpu"} and limits["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]) and spec["nodeSelector"]
    elif overlay.endswith("tpu"):
        assert accelerators == {"google.com/tpu"} and limits["google.com/tpu"] >= 1
        assert {"cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology"} <= set(
            spec["nodeSelector"])
    else:
        assert not accelerators and "nodeSelector" not in spec


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_validate_against_the_api_schema(rendered, target, version):
    """Every built-in object passes kubernetes-validate's strict schema (unknown fields are errors); the only
    objects without a schema are the two CRDs, checked by `test_custom_resources`."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in rendered[target]:
        if doc["kind"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{target}: {doc['kind']} {doc['metadata']['name']} is invalid for {version}: {e.message}")


def _metric_names() -> set[str]:
    """The metric families `lmjax serve` exposes, with histogram sample suffixes (from lmjax/serve/metrics.py)."""
    from lmjax.serve.metrics import Metrics

    names = set()
    for family in Metrics("m", lambda: (0, 0, 0.0)).registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
    return names


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources(rendered, target):
    """ServiceMonitor and ScaledObject: API version, the fields their CRDs require, and queries that name
    metrics the server really exposes, filtered on the labels Prometheus gives this Service's series."""
    docs = rendered[target]
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == CRDS[doc["kind"]]
            assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == NAMESPACE

    monitor = _one(docs, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"] and monitor["endpoints"]
    for endpoint in monitor["endpoints"]:
        assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "15s")
        assert re.fullmatch(r"\d+s", endpoint["scrapeTimeout"]) and int(endpoint["scrapeTimeout"][:-1]) < 15

    if not TARGETS[target][4]:
        return
    scaled = _one(docs, "ScaledObject")["spec"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert set(scaled["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    triggers = {t["name"]: t for t in scaled["triggers"]}
    known = _metric_names()
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus" and trigger["metricType"] in ("AverageValue", "Value")
        meta = trigger["metadata"]
        assert set(meta) >= {"serverAddress", "query", "threshold"} and meta["serverAddress"].startswith("http")
        assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0  # KEDA wants a string
        used = set(re.findall(r"lmjax:[a-z_]+", meta["query"]))
        assert used and used <= known, f"unknown metrics {used - known}"
        assert f'namespace="{NAMESPACE}"' in meta["query"] and 'service="lmjax"' in meta["query"]
        assert meta["query"].count("(") == meta["query"].count(")")

    queue = triggers["queue"]
    assert queue["metricType"] == "AverageValue" and queue["metadata"]["threshold"] == "5"
    assert queue["metadata"]["query"].startswith("sum(lmjax:num_requests_waiting{")
    if "components/keda-ttft" in TARGETS[target][1]:
        ttft = triggers["ttft-p95"]
        assert ttft["metricType"] == "Value" and float(ttft["metadata"]["threshold"]) == 1.0
        query = " ".join(ttft["metadata"]["query"].split())
        assert query.startswith("(histogram_quantile(0.95, sum by (le) (rate(lmjax:time_to_first_token_seconds_bucket{")
        assert "[2m]" in query
    else:
        assert set(triggers) == {"queue"}


def test_secret_example_is_a_valid_keys_file_and_not_rendered(rendered, tmp_path):
    """secret-example.yaml has the name and key the pods mount, its keys.toml is accepted by the server's
    parser, and it is in no kustomization (no rendered target contains a Secret)."""
    from lmjax.serve.auth import read_keys

    secret = yaml.safe_load((K8S / "base" / "secret-example.yaml").read_text())
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", "lmjax-api-keys")
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(secret["stringData"]["keys.toml"])
    keys = read_keys(keys_file)
    assert len(keys) == 2 and all("REPLACE-ME" in k.key for k in keys)
    assert tomllib.loads(keys_file.read_text())["keys"][0]["name"] == "alice"
    for path in K8S.rglob("kustomization.yaml"):
        assert "secret-example" not in yaml.safe_load(path.read_text()).get("resources", []), path
    assert all(d["kind"] != "Secret" for docs in rendered.values() for d in docs)


@pytest.fixture()
def sync_run():
    """deploy/k8s/base/sync_run.py as a module (the script the init container runs)."""
    spec = importlib.util.spec_from_file_location("sync_run", K8S / "base" / "sync_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_run_mirrors_the_model_and_keeps_the_replicas_own_files(sync_run, tmp_path):
    """The first start copies the run; a restart copies nothing; a checkpoint removed from the source (a model
    rolled back) goes from the replica too, while its feedback database and compile cache stay."""
    source, run = tmp_path / "model", tmp_path / "run"
    files = {"config.json": "{}", "tokenizer/tokenizer.model": "tok", "checkpoints/10/params": "a" * 10,
             "checkpoints/20/params": "b" * 20, "metrics.jsonl": "not served"}
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    run.mkdir()
    (run / "feedback.sqlite").write_text("ratings")
    (run / "xla-cache").mkdir()
    (run / "xla-cache" / "program").write_text("compiled")
    (run / "checkpoints" / "30").mkdir(parents=True)   # a stale step the source never had (or no longer has)
    (run / "checkpoints" / "20").mkdir()
    (run / "checkpoints" / "20" / "params.part").write_text("interrupted copy")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "old.vocab").write_text("from a previous model")

    assert sync_run.sync(source, run) == 2 + 3 + 10 + 20
    listing = lambda: sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert listing() == ["checkpoints/10/params", "checkpoints/20/params", "config.json", "feedback.sqlite",
                         "tokenizer/tokenizer.model", "xla-cache/program"]
    assert (run / "checkpoints" / "20" / "params").read_text() == "b" * 20
    assert sync_run.sync(source, run) == 0

    shutil.rmtree(source / "checkpoints" / "20")
    (source / "config.json").write_text('{"changed": 1}')
    assert sync_run.sync(source, run) == len('{"changed": 1}')
    assert not (run / "checkpoints" / "20").exists() and (run / "checkpoints" / "10" / "params").is_file()
    assert (run / "feedback.sqlite").read_text() == "ratings" and (run / "xla-cache" / "program").is_file()

    shutil.rmtree(source / "tokenizer")
    with pytest.raises(SystemExit, match="lacks tokenizer"):
        sync_run.sync(source, run)


def test_sync_run_is_what_the_init_container_runs(rendered):
    """The init container runs sync_run.py from the generated ConfigMap, from the read-only model volume into
    the server's run directory, and the ConfigMap holds the script as it is in the repository."""
    docs = rendered["cpu"]
    spec = _pod(docs)["spec"]
    init = next(c for c in spec["initContainers"] if c["name"] == "sync-run")
    mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    script, source, run = init["command"][1:]
    assert init["command"][0] == "python3" and Path(script).name == "sync_run.py"
    config_map = volumes[mounts[str(Path(script).parent)]["name"]]["configMap"]["name"]
    data = _one(docs, "ConfigMap", config_map)["data"]["sync_run.py"]
    assert data == (K8S / "base" / "sync_run.py").read_text()
    assert mounts[source]["readOnly"] is True
    assert volumes[mounts[source]["name"]]["persistentVolumeClaim"]["claimName"] == "lmjax-model"
    server_run = next(m for m in _server(docs)["volumeMounts"] if m["mountPath"] == run)
    assert server_run["name"] == mounts[run]["name"] and not mounts[run].get("readOnly", False)


def test_merged_feedback_keeps_pairs_split_over_replicas(tmp_path):
    """Two replicas each stored one reply to the same conversation, liked on one and disliked on the other:
    exporting each database finds no pair, the merged database finds it; edits follow their reply through the
    renumbering, and a database merged twice is refused instead of counted twice."""
    from lmjax.serve.feedback import FILENAME, FeedbackStore, export_preferences

    spec = importlib.util.spec_from_file_location("merge_feedback", K8S / "merge_feedback.py")
    merge_feedback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_feedback)

    question = [{"role": "user", "content": "What does len do?"}]
    replicas = []
    for i, (reply, vote) in enumerate([("It counts items.", 1), ("It sorts.", -1)]):
        store = FeedbackStore(tmp_path / f"replica-{i}.sqlite")
        store.record_reply([{"role": "user", "content": f"filler {i}"}], "unrated", public_id=f"chatcmpl-f{i}:0")
        reply_id = store.record_reply(question, reply, public_id=f"chatcmpl-{i}:0")
        store.rate(reply_id, vote)
        if vote < 0:
            store.edit(reply_id, "It returns the number of items.")
        store.close()
        replicas.append(tmp_path / f"replica-{i}.sqlite")

    separately = [pair for db in replicas for pair in export_preferences(db)]
    assert [(p["chosen"], p["rejected"]) for p in separately] == [("It returns the number of items.", "It sorts.")]

    assert merge_feedback.merge(tmp_path / "merged", replicas) == 4
    merged = sorted((p["chosen"], p["rejected"]) for p in export_preferences(tmp_path / "merged" / FILENAME))
    assert merged == [("It counts items.", "It sorts."), ("It returns the number of items.", "It sorts.")]
    assert all(p["prompt"] == question for p in export_preferences(tmp_path / "merged" / FILENAME))

    with pytest.raises(SystemExit, match="exists"):
        merge_feedback.merge(tmp_path / "merged", replicas)
    with pytest.raises(sqlite3.IntegrityError):
        merge_feedback.merge(tmp_path / "twice", [replicas[0], replicas[0]])
    assert not list((tmp_path / "twice").glob(FILENAME + "*"))
