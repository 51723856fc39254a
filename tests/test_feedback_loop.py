"""experiments/feedback_loop.py without training: preference accuracy, the promotion rule, merging live replica
databases into pairs, the reload call (answered, refused, unreachable), and its Kubernetes CronJob
(deploy/k8s/feedback-loop), rendered into the CPU overlay and checked against the StatefulSet it serves.
The loop end to end (DPO and evaluation) is run by hand: docs/deploy.md shows the command and its result."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from lmjax.cli import build_parser as lmjax_parser
from lmjax.serve.feedback import FeedbackStore

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"

_spec = importlib.util.spec_from_file_location("feedback_loop", ROOT / "experiments" / "feedback_loop.py")
loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop)

SERVING = {"preference_accuracy": 0.50, "rouge_l": 0.30}


def test_preference_accuracy_counts_positive_margins_and_ties_half():
    # margins: +1, -1, 0, +1 -> (1 + 0 + 0.5 + 1) / 4
    assert loop.preference_accuracy([-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0, -3.0, -5.0]) == 0.625
    assert loop.preference_accuracy([-1.0], [-0.5]) == 0.0
    assert math.isnan(loop.preference_accuracy([], []))


@pytest.mark.parametrize(("candidate", "heldout", "promote", "reason"), [
    ({"preference_accuracy": 0.60, "rouge_l": 0.31}, 20, True, "preference accuracy 0.600 >= 0.500"),
    ({"preference_accuracy": 0.50, "rouge_l": 0.295}, 20, True, "ROUGE-L 0.295 >= 0.300 - 0.01"),  # tie, within tol
    ({"preference_accuracy": 0.49, "rouge_l": 0.40}, 20, False, "preference accuracy 0.490 < serving's"),
    ({"preference_accuracy": 0.90, "rouge_l": 0.28}, 20, False, "ROUGE-L 0.280 < serving's 0.300 - 0.01"),
    ({"preference_accuracy": 0.90, "rouge_l": 0.40}, 7, False, "only 7 held-out pairs"),
    ({"preference_accuracy": float("nan"), "rouge_l": 0.40}, 20, False, "preference accuracy nan"),
])
def test_promotion_rule(candidate, heldout, promote, reason):
    decided, why = loop.promotion_decision(SERVING, candidate, heldout, loop.Rule(min_heldout_pairs=8,
                                                                                  rouge_tolerance=0.01))
    assert decided is promote
    assert reason in why


def test_pairs_from_live_replicas_keep_cross_replica_votes(tmp_path):
    """The liked reply was served by one replica, the disliked one by another: only merging finds the pair.
    The replicas' databases stay open for writing (WAL) while the loop copies them."""
    prompt = [{"role": "user", "content": "How do I sort a list?"}]
    stores = []
    for replica, (reply, vote) in enumerate((("Use sorted(xs).", 1), ("Use a loop.", -1))):
        (tmp_path / f"lmjax-{replica}").mkdir()
        store = FeedbackStore(tmp_path / f"lmjax-{replica}" / "feedback.sqlite")
        store.rate(store.record_reply(prompt, reply, 7, {}, "s"), vote)
        stores.append(store)
    try:
        sources = loop.expand([str(tmp_path / "lmjax-*" / "feedback.sqlite")])
        assert [s.parent.name for s in sources] == ["lmjax-0", "lmjax-1"]
        pairs = loop.gather_pairs(sources, tmp_path / "out")
    finally:
        for store in stores:
            store.close()
    assert pairs == [{"prompt": prompt, "chosen": "Use sorted(xs).", "rejected": "Use a loop."}]


def test_publish_makes_the_candidate_the_latest_step_and_keeps_the_rest(tmp_path):
    """Replicas (sync_run.py) and a reload without a step load the latest step of the published directory: the
    candidate's step replaces every older or newer one there; the feedback database beside it stays."""
    candidate, target = tmp_path / "candidate", tmp_path / "model"
    for run, step, text in ((candidate, 40, "new"), (target, 100, "old")):
        (run / "checkpoints" / str(step)).mkdir(parents=True)
        (run / "checkpoints" / str(step) / "params").write_text(text)
        (run / "tokenizer").mkdir()
        (run / "tokenizer" / "tokenizer.model").write_text(text)
        (run / "config.json").write_text(json.dumps({"run": text}))
    (target / "checkpoints" / "20").mkdir()
    (candidate / "checkpoints" / "20").mkdir()  # an older step of the candidate is not copied
    (target / "feedback.sqlite").write_text("votes")
    assert loop.publish(candidate, target) == 40
    assert sorted(p.name for p in (target / "checkpoints").iterdir()) == ["40"]
    assert (target / "checkpoints" / "40" / "params").read_text() == "new"
    assert (target / "tokenizer" / "tokenizer.model").read_text() == "new"
    assert json.loads((target / "config.json").read_text()) == {"run": "new"}
    assert (target / "feedback.sqlite").read_text() == "votes"


class _Reload(BaseHTTPRequestHandler):
    """A stand-in for the server's POST /admin/reload: 200 for the admin key, 403 for any other."""

    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Reload.seen.append((self.path, self.headers.get("Authorization"), body))
        ok = self.headers.get("Authorization") == "Bearer admin-key"
        answer = {"model": "model", "workdir": body["workdir"], "step": 40} if ok else {"error": "not admin"}
        data = json.dumps(answer).encode()
        self.send_response(200 if ok else 403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_reload_answered_refused_and_unreachable():
    server = HTTPServer(("127.0.0.1", 0), _Reload)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        ok = loop.reload(url, "/model-src", "admin-key", timeout=10)
        refused = loop.reload(url + "/", "/model-src", "user-key", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert ok == {"server": url, "ok": True, "answer": {"model": "model", "workdir": "/model-src", "step": 40}}
    assert _Reload.seen[0] == ("/admin/reload", "Bearer admin-key", {"workdir": "/model-src", "step": None})
    assert not refused["ok"] and "HTTP 403" in refused["error"] and "admin = true" in refused["error"]
    unreachable = loop.reload(url, None, None, timeout=10)  # the port is closed now
    assert not unreachable["ok"] and "could not reach the server" in unreachable["error"]


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("LMJAX_ADMIN_KEY", "from-env")
    args = loop.build_parser().parse_args(["--serving", "r", "--out", "o"])
    assert args.api_key == "from-env" and args.feedback == [] and not args.dry_run


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    """The CPU overlay with the feedback-loop component, as a user enables it."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    directory = tmp_path_factory.mktemp("feedback-loop")
    rel = lambda p: Path(os.path.relpath(K8S / p, directory)).as_posix()  # noqa: E731
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel("overlays/cpu")], "components": [rel("feedback-loop")]}))
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _mounts(container: dict, volumes: list[dict]) -> dict[str, tuple[dict, bool]]:
    """mountPath -> (the volume's source, read-only?); a StatefulSet's claim templates are not in `volumes`."""
    by_name = {v["name"]: v for v in volumes}
    return {m["mountPath"]: (by_name.get(m["name"], {"volumeClaimTemplate": m["name"]}), m.get("readOnly", False))
            for m in container["volumeMounts"]}


def _under(path: str, mounts: dict) -> tuple[dict, bool]:
    """The mount that holds `path`."""
    best = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default=None)
    assert best is not None, f"{path} is on no mounted volume"
    return mounts[best]


def test_cronjob_validates_and_its_arguments_fit_the_cluster(rendered):
    """Strictly valid for Kubernetes 1.37; the loop's arguments parse; every path it reads or writes is on the
    right volume (the served model read-write, each replica's run directory read-only, the script from the
    ConfigMap); each --server is a replica's name under the StatefulSet's headless Service; and the reload's
    --reload-workdir is the same model volume as the servers see it. The server's own arguments, with the
    component's extra mount, still parse with lmjax's parser."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cronjob, statefulset = _one(rendered, "CronJob"), _one(rendered, "StatefulSet")
    for doc in (cronjob, statefulset):
        kubernetes_validate.validate(doc, "1.37", strict=True)
    assert cronjob["metadata"]["namespace"] == statefulset["metadata"]["namespace"] == "lmjax"
    job = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid" and job["restartPolicy"] == "Never"
    (container,) = job["containers"]
    server = next(c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "lmjax")
    assert container["image"] == server["image"] == "lmjax:cpu"

    command = container["command"]
    assert command[0] == "python3"
    args = loop.build_parser().parse_args(container["args"])
    mounts = _mounts(container, job["volumes"])
    script_volume, script_ro = _under(command[1], mounts)
    assert script_ro and script_volume["configMap"]["name"] == "lmjax-feedback-loop"

    model_claim = "lmjax-model"
    for path in (args.serving, args.out, args.publish):
        volume, read_only = _under(path, mounts)
        assert volume["persistentVolumeClaim"]["claimName"] == model_claim and not read_only, path
    assert args.publish == args.serving  # the next night's serving run is what was published
    feedback_root = args.feedback[0].split("*")[0].rstrip("/")
    replica_mounts = {m: v for m, v in mounts.items() if m.startswith(feedback_root + "/")}
    assert replica_mounts, "no replica run directory under the --feedback glob"
    claims = set()
    for volume, read_only in replica_mounts.values():
        claim = volume["persistentVolumeClaim"]
        assert read_only and claim["readOnly"]
        claims.add(claim["claimName"])
    template = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    ordinals = sorted(int(c.rsplit("-", 1)[1]) for c in claims)
    assert claims == {f"{template}-{name}-{n}" for n in ordinals}
    port = next(p["containerPort"] for p in server["ports"] if p["name"] == "http")
    assert args.server == [f"http://{name}-{n}.{service}.lmjax.svc:{port}" for n in ordinals]
    assert next(e for e in container["env"] if e["name"] == "LMJAX_ADMIN_KEY")["valueFrom"]["secretKeyRef"]

    server_mounts = _mounts(server, statefulset["spec"]["template"]["spec"]["volumes"])
    volume, read_only = _under(args.reload_workdir, server_mounts)
    assert read_only and volume["persistentVolumeClaim"]["claimName"] == model_claim
    parsed = lmjax_parser().parse_args(server["args"])
    assert parsed.command == "serve" and parsed.workdir == "/runs/model"
