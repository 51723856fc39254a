"""The improvement loop in one command: feedback -> DPO candidate -> held-out gate -> promotion -> live reload.

    python experiments/feedback_loop.py --serving runs/sft --feedback 'runs/sft/feedback*.sqlite' \\
        --out runs/loop/2026-11-26 [--steps 100] [--server http://127.0.0.1:8000 --api-key KEY]

Steps, each logged with its elapsed time:
1. take a consistent copy (SQLite's backup API) of every feedback database matched by the `--feedback` globs
   (one per `lmjax serve` replica), merge them with `deploy/k8s/merge_feedback.py`'s `merge` (pairs whose liked
   and disliked replies were served by different replicas survive), export preference pairs with
   `lmjax.serve.feedback.export_preferences` and split them by a hash of the prompt into training and held-out
   pairs (`lmjax.input.pairs.split_heldout`: every pair of one conversation on one side);
2. train DPO from the serving run (`init_from` = `--serving`, which stays frozen as the reference; its own
   config.json with `train.objective=dpo`, so the model always matches) into OUT/candidate;
3. evaluate the serving run and the candidate on the same held-out data: preference accuracy on the held-out
   pairs (share of pairs where log p(chosen) - log p(rejected) > 0, ties count half) and greedy ROUGE-L on
   held-out chat questions (`lmjax.eval.chat_qa.evaluate_workdir`);
4. promote the candidate only if it is not worse (`promotion_decision`): at least `--min-heldout-pairs` held-out
   pairs (with fewer, steps 2 and 3 are skipped), candidate preference accuracy >= serving's, and candidate
   ROUGE-L >= serving's - `--rouge-tolerance`;
5. on promotion, optionally copy the candidate's served files into `--publish DIR` (the directory new replicas
   copy their model from) and call `POST {server}/admin/reload` on every `--server` (unless `--dry-run`).

OUT/report.json records the inputs, every metric, the rule, the decision and each reload's answer. Exit status:
0 when the loop ran (promoted or not), 1 on bad input, 2 when a reload was requested and no server took it.

Without real feedback, `--demo-feedback N` lets the serving model answer N training and N/4 held-out chat
questions twice and plays a user who prefers the reply closer to the reference (experiments/dpo_feedback.py's
scripted user), so the whole loop runs on a fresh `tiny` run. On a 2-core CPU with a 0.14M-parameter chat run,
`--demo-feedback 1024 --heldout-fraction 0.2 --steps 40 --lr 1e-3 --eval-questions 64` took 65 s: 303 pairs
(63 held out), preference accuracy 0.317 -> 0.349, ROUGE-L 0.001 -> 0.019, promoted. DPO does not always win on
held-out pairs (another feedback mix gave 0.256 -> 0.231, kept): that is what the gate is for. docs/deploy.md,
"Feedback from many replicas", has the Kubernetes CronJob that runs this nightly (deploy/k8s/feedback-loop).
"""

import argparse
import glob
import importlib.util
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

HERE = Path(__file__).resolve().parent
# Where the helpers live: next to this file (the Kubernetes ConfigMap holds all three files in one directory)
# or in the repository.
SEARCH = (HERE, HERE.parent / "experiments", HERE.parent / "deploy" / "k8s")
REPLY_TOKENS = 48  # what dpo_feedback.collect_feedback samples per reply
BATCH_SLOTS = 32  # replies the scripted user's model generates at once


def _load(name: str) -> ModuleType:
    """Imports `name`.py from the first directory of SEARCH that holds it."""
    for directory in SEARCH:
        path = directory / f"{name}.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
    raise SystemExit(f"feedback_loop: {name}.py not found in {', '.join(map(str, SEARCH))}")


@dataclass(frozen=True)
class Rule:
    """When a candidate replaces the serving model."""

    min_heldout_pairs: int = 8
    rouge_tolerance: float = 0.01

    def describe(self) -> str:
        """The rule in words, for the report."""
        return (f"promote iff held-out pairs >= {self.min_heldout_pairs} and candidate preference accuracy >= "
                f"serving's and candidate ROUGE-L >= serving's - {self.rouge_tolerance}")


def preference_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose log-prob margin log p(chosen) - log p(rejected) is positive; ties count half.
    NaN for no pairs."""
    margin = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    if margin.size == 0:
        return float("nan")
    return float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))))


def promotion_decision(serving: dict, candidate: dict, heldout_pairs: int, rule: Rule) -> tuple[bool, str]:
    """(promote?, why) from the `preference_accuracy` and `rouge_l` of both models under `rule`."""
    if heldout_pairs < rule.min_heldout_pairs:
        return False, f"only {heldout_pairs} held-out pairs (< {rule.min_heldout_pairs}): too few to judge"
    if not candidate["preference_accuracy"] >= serving["preference_accuracy"]:
        return False, (f"preference accuracy {candidate['preference_accuracy']:.3f} < serving's "
                       f"{serving['preference_accuracy']:.3f}")
    if not candidate["rouge_l"] >= serving["rouge_l"] - rule.rouge_tolerance:
        return False, (f"ROUGE-L {candidate['rouge_l']:.3f} < serving's {serving['rouge_l']:.3f} - "
                       f"{rule.rouge_tolerance}")
    return True, (f"preference accuracy {candidate['preference_accuracy']:.3f} >= {serving['preference_accuracy']:.3f}"
                  f" and ROUGE-L {candidate['rouge_l']:.3f} >= {serving['rouge_l']:.3f} - {rule.rouge_tolerance}")


def expand(patterns: Sequence[str]) -> list[Path]:
    """The files matched by the globs, each once, in order."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else []):
            found[Path(name).resolve()] = None
    return list(found)


def snapshot(source: Path, target: Path) -> str:
    """A consistent copy of a (possibly live, WAL-mode) SQLite database; returns how it was taken.

    SQLite's backup API, the source opened read-only, where SQLite can open it: its directory is writable, or
    the live writer's -shm file is there. On a read-only mount of a database that nobody has open (no -shm),
    SQLite cannot open a WAL database at all; then the file and its -wal are copied to a temporary directory,
    opened there (SQLite replays the -wal) and checked with `PRAGMA quick_check` before the backup."""
    try:
        _backup(f"file:{source}?mode=ro", target)
        return "backup"
    except sqlite3.OperationalError as e:
        if "unable to open" not in str(e):
            raise
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        copy = Path(tmp) / source.name
        for suffix in ("", "-wal"):
            if Path(f"{source}{suffix}").is_file():
                shutil.copyfile(f"{source}{suffix}", f"{copy}{suffix}")
        conn = sqlite3.connect(copy)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
        if check != "ok":
            raise SystemExit(f"feedback_loop: the copy of {source} is damaged ({check}); rerun the loop")
        target.unlink(missing_ok=True)
        _backup(str(copy), target)
    return "file copy (read-only, not open)"


def _backup(uri: str, target: Path) -> None:
    """SQLite's online backup of the database at `uri` into `target`."""
    src = sqlite3.connect(uri, uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def gather_pairs(sources: Sequence[Path], out: Path) -> list[dict]:
    """Preference pairs of the merged copies of `sources` (OUT/feedback/feedback.sqlite is the merge)."""
    from lmjax.serve.feedback import export_preferences

    merge = _load("merge_feedback").merge
    copies = out / "feedback-copies"
    copies.mkdir(parents=True, exist_ok=True)
    targets = []
    for index, source in enumerate(sources):
        target = copies / f"{index}-{source.parent.name}.sqlite"
        target.unlink(missing_ok=True)
        print(f"  {source}: {snapshot(source, target)}", flush=True)
        targets.append(target)
    shutil.rmtree(out / "feedback", ignore_errors=True)
    replies = merge(out / "feedback", targets)
    pairs = export_preferences(out / "feedback" / "feedback.sqlite")
    print(f"  {len(sources)} databases, {replies} replies, {len(pairs)} pairs", flush=True)
    return pairs


def demo_feedback(serving: Path, questions: int, out: Path, seed: int) -> Path:
    """A feedback database of scripted ratings (experiments/dpo_feedback.py's user) on `questions` training
    and `questions // 4` held-out chat questions."""
    from lmjax.eval.chat_qa import qa_pairs
    from lmjax.input.specs import read_chat
    from lmjax.serve.feedback import FeedbackStore

    collect_feedback = _load("dpo_feedback").collect_feedback
    path = out / "demo-feedback" / "feedback.sqlite"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    from lmjax.serve.engine import ChatEngine
    from lmjax.text.chat_template import encode_chat

    model = ChatEngine.from_workdir(serving, num_slots=BATCH_SLOTS)
    store = FeedbackStore(partial)
    for spec, limit in (("stdlib:train", questions), ("stdlib:heldout", questions // 4)):
        items = [(prompt, reference) for prompt, reference in qa_pairs(read_chat(spec))
                 if len(encode_chat(prompt, model.tokenizer, add_generation_prompt=True)[0]) + REPLY_TOKENS
                 < model.context]  # room for the reply
        random.Random(seed).shuffle(items)
        collect_feedback(model, items[:limit], store, f"scripted-{spec}", seed)
    store.close()
    model.close()
    partial.rename(path)
    return path


def pair_logprobs(workdir: Path, pairs: Sequence[dict], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """log p(chosen) and log p(rejected) of each encodable pair under the run's latest parameters."""
    import jax

    from lmjax.input.pairs import SIDES, encode_pairs
    from lmjax.run.restore import restore_model
    from lmjax.run.workdir import open_workdir
    from lmjax.train.dpo import sequence_logprobs

    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(workdir))
    rows, _ = encode_pairs(list(pairs), tokenizer, cfg.model.seq_len)
    logprobs = jax.jit(lambda p, batch: sequence_logprobs(p, graphdef, batch))
    sides: dict[str, list] = {s: [] for s in SIDES}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        for s in SIDES:
            batch = {k: np.stack([r[f"{s}_{k}"] for r in chunk])
                     for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
            sides[s] += list(np.asarray(logprobs(params, batch)))
    return np.asarray(sides["chosen"]), np.asarray(sides["rejected"])


def evaluate(workdir: Path, heldout: Sequence[dict], questions: int) -> dict:
    """Preference accuracy on `heldout` and greedy ROUGE-L on the first `questions` held-out chat questions."""
    from lmjax.eval.chat_qa import evaluate_workdir

    chosen, rejected = pair_logprobs(workdir, heldout)
    metrics = evaluate_workdir(str(workdir), limit=questions)[0]
    return {"preference_accuracy": preference_accuracy(chosen, rejected),
            "mean_margin": float(np.mean(chosen - rejected)) if chosen.size else float("nan"),
            "rouge_l": metrics["rouge_l"], "exact_match": metrics["exact_match"]}


def dpo_config(serving: Path, train_file: Path, heldout_file: Path, args: argparse.Namespace):
    """The serving run's own config turned into a DPO run from it (so the model always matches)."""
    from lmjax.config import apply_overrides
    from lmjax.run.workdir import Workdir

    every = max(args.steps // 2, 1)
    return apply_overrides(Workdir(serving).load_config(), [
        f"init_from={serving}", "init_from_step=-1", "train.objective=dpo", f"train.dpo_beta={args.beta}",
        f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={max(args.steps // 10, 1)}",
        "train.weight_decay=0.0", f"train.eval_every={every}", f"train.ckpt_every={every}", "train.samples=",
        f"data.train=pairs:{train_file}", f"data.val=pairs:{heldout_file}", *args.config])


def publish(candidate: Path, target: Path) -> int:
    """Copies the candidate's config.json, tokenizer/ and latest checkpoint into `target` (where replicas copy
    their model from), then removes the other steps there, so that `target`'s latest step is the candidate's."""
    step = max(int(p.name) for p in (candidate / "checkpoints").iterdir() if p.name.isdigit())
    target.mkdir(parents=True, exist_ok=True)
    (target / "checkpoints").mkdir(exist_ok=True)
    staging = target / "checkpoints" / f".incoming-{step}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(candidate / "checkpoints" / str(step), staging)
    for old in (target / "checkpoints").iterdir():
        if old != staging:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    staging.rename(target / "checkpoints" / str(step))
    shutil.rmtree(target / "tokenizer", ignore_errors=True)
    shutil.copytree(candidate / "tokenizer", target / "tokenizer")
    shutil.copy2(candidate / "config.json", target / "config.json")
    return step


def reload(server: str, workdir: str | None, api_key: str | None, timeout: float) -> dict:
    """POST {server}/admin/reload; returns {"server", "ok", and the answer or the error}."""
    body = json.dumps({"workdir": workdir, "step": None}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(server.rstrip("/") + "/admin/reload", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return {"server": server, "ok": True, "answer": json.loads(response.read() or b"{}")}
    except urllib.error.HTTPError as e:
        hint = {401: "missing or unknown --api-key", 403: "the key needs `admin = true` in the keys file",
                404: "this server has no /admin/reload (an older lmjax?)", 409: "another reload is running",
                503: "the server is still compiling"}.get(e.code)
        detail = e.read().decode(errors="replace")[:500]
        return {"server": server, "ok": False, "error": f"HTTP {e.code}{f' ({hint})' if hint else ''}: {detail}"}
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return {"server": server, "ok": False, "error": f"could not reach the server ({reason}); the candidate is "
                "promoted in the report but not live there: retry the reload or restart that server"}


def build_parser() -> argparse.ArgumentParser:
    """The loop's arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving", required=True, help="run directory of the model being served")
    parser.add_argument("--feedback", action="append", default=[],
                        help="glob of feedback databases, one per replica (repeatable)")
    parser.add_argument("--demo-feedback", type=int, default=0,
                        help="no real feedback: scripted ratings on this many chat questions (see above)")
    parser.add_argument("--out", required=True, help="directory for the pairs, the candidate run and report.json")
    parser.add_argument("--steps", type=int, default=100, help="DPO steps")
    parser.add_argument("--lr", type=float, default=1e-5, help="DPO learning rate")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--config", action="append", default=[], help="more DPO config overrides KEY=VALUE")
    parser.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="share of conversations (by a hash of the prompt) held out for the gate")
    parser.add_argument("--eval-questions", type=int, default=128, help="held-out chat questions for ROUGE-L")
    parser.add_argument("--min-heldout-pairs", type=int, default=Rule.min_heldout_pairs,
                        help="promote only with at least this many held-out pairs")
    parser.add_argument("--rouge-tolerance", type=float, default=Rule.rouge_tolerance,
                        help="how much lower than serving's the candidate's ROUGE-L may be")
    parser.add_argument("--publish", help="on promotion, copy the candidate's served files into this directory")
    parser.add_argument("--server", action="append", default=[], help="server to reload on promotion (repeatable)")
    parser.add_argument("--api-key", default=os.environ.get("LMJAX_ADMIN_KEY"),
                        help="key with `admin = true` for /admin/reload (default: $LMJAX_ADMIN_KEY)")
    parser.add_argument("--reload-workdir",
                        help="the promoted run's path as the servers see it (default: the candidate's path here)")
    parser.add_argument("--reload-timeout", type=float, default=1800.0, help="seconds to wait for each reload")
    parser.add_argument("--dry-run", action="store_true", help="decide and report, but neither publish nor reload")
    parser.add_argument("--seed", type=int, default=0, help="scripted feedback's seed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lmjax.input.pairs import split_heldout
    from lmjax.text.io import write_jsonl
    from lmjax.train.loop import train

    serving, out, start = Path(args.serving).resolve(), Path(args.out).resolve(), time.time()
    if not (serving / "config.json").is_file():
        print(f"feedback_loop: {serving} is not a trained run (no config.json)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)

    def stage(text: str) -> None:
        print(f"[{time.time() - start:5.0f}s] {text}", flush=True)

    sources = expand(args.feedback)
    if args.demo_feedback:
        stage(f"scripted feedback on {args.demo_feedback} questions")
        sources.append(demo_feedback(serving, args.demo_feedback, out, args.seed))
    if not sources:
        print(f"feedback_loop: no feedback database matches {args.feedback}", file=sys.stderr)
        return 1
    stage("merging and exporting feedback")
    train_pairs, heldout = split_heldout(gather_pairs(sources, out), args.heldout_fraction)
    files = {"train": out / "prefs_train.jsonl", "heldout": out / "prefs_heldout.jsonl"}
    write_jsonl(train_pairs, files["train"])
    write_jsonl(heldout, files["heldout"])
    report: dict = {"serving": str(serving), "feedback": [str(s) for s in sources],
                    "train_pairs": len(train_pairs), "heldout_pairs": len(heldout)}
    rule = Rule(args.min_heldout_pairs, args.rouge_tolerance)
    if not train_pairs:
        report.update(promote=False, reason="no training pairs in the feedback")
    elif len(heldout) < rule.min_heldout_pairs:  # the rule could not promote: skip the training
        report.update(promote=False, reason=promotion_decision({}, {}, len(heldout), rule)[1])
    else:
        stage(f"DPO on {len(train_pairs)} pairs ({len(heldout)} held out) -> {out / 'candidate'}")
        candidate = out / "candidate"
        if candidate.exists():
            shutil.rmtree(candidate)
        result = train(dpo_config(serving, files["train"], files["heldout"], args), candidate)
        report["candidate"] = str(candidate)
        report["dpo"] = {k: v for k, v in result.items() if isinstance(v, int | float)}
        stage("evaluating serving and candidate on held-out pairs and questions")
        report["metrics"] = {"serving": evaluate(serving, heldout, args.eval_questions),
                             "candidate": evaluate(candidate, heldout, args.eval_questions)}
        promote, reason = promotion_decision(report["metrics"]["serving"], report["metrics"]["candidate"],
                                             len(heldout), rule)
        report.update(promote=promote, reason=reason)
    report["rule"] = {**asdict(rule), "text": rule.describe()}
    stage(f"{'PROMOTE' if report['promote'] else 'keep the serving model'}: {report['reason']}")

    status = 0
    if report["promote"] and not args.dry_run:
        if args.publish:
            report["published"] = {"dir": args.publish, "step": publish(Path(report["candidate"]), Path(args.publish))}
            stage(f"published step {report['published']['step']} into {args.publish}")
        workdir = args.reload_workdir or report["candidate"]
        report["reloads"] = [reload(s, workdir, args.api_key, args.reload_timeout) for s in args.server]
        for answer in report["reloads"]:
            stage(f"reload {answer['server']}: " + (json.dumps(answer["answer"]) if answer["ok"] else answer["error"]))
        if args.server and not any(answer["ok"] for answer in report["reloads"]):
            status = 2
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stage(f"report: {out / 'report.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
