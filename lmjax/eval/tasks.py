"""Few-shot tasks: multiple choice scored by log-likelihood, generation scored against references.

A task is a YAML file beside its JSONL data (lmjax/eval/tasks/ ships some; `--tasks-dir` adds a user's):

    name: stdlib_module_mc            # what --tasks selects
    kind: multiple_choice             # or generation
    data: stdlib_module_mc.jsonl      # rows {"context", "choices", "answer"} or {"context", "target"}
    fewshot: 3                        # solved examples put before each question (rows with "split": "fewshot")
    delimiter: " "                    # between a context and its answer
    separator: "\n\n"                 # between examples
    chat: false                       # generation: ask through the chat template instead of raw text
    until: ["\n"]                     # generation: cut the reply at these strings
    max_tokens: 32                    # generation: longest reply
    metric: acc_norm                  # multiple choice: what `centered` centers (acc, acc_norm or acc_bytes)

Multiple choice reports accuracy from the summed log-likelihood of each choice (`acc`) and from it divided by the
choice's length in characters (`acc_norm`) and in UTF-8 bytes (`acc_bytes`), as lm-eval defines them, the chance
level (mean of 1 / choices) and the task's `metric` centered on it, (metric - chance) / (1 - chance) as nanochat's
CORE does: 0 is guessing, 1 perfect.
Generation reports exact match and ROUGE-L of greedy replies (chance 0).
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from lmjax.config import DataError
from lmjax.eval.chat_qa import score as score_replies
from lmjax.eval.loglik import LoglikScorer
from lmjax.infer.sampler import Sampler
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir
from lmjax.text.chat_template import encode_chat
from lmjax.text.io import read_jsonl

BUILTIN = Path(__file__).with_name("tasks")
KINDS = ("multiple_choice", "generation")


@dataclasses.dataclass(frozen=True)
class Task:
    """A task's settings and rows (see the module docstring)."""

    name: str
    kind: str
    rows: list[dict]
    shots: list[dict]
    delimiter: str = " "
    separator: str = "\n\n"
    chat: bool = False
    until: tuple[str, ...] = ("\n",)
    max_tokens: int = 32
    metric: str = "acc_norm"

    def prompt(self, row: dict) -> str:
        """The few-shot examples, then the row's context."""
        solved = [s["context"] + self.delimiter + (s["choices"][s["answer"]] if self.kind == "multiple_choice"
                                                   else s["target"]) for s in self.shots]
        return self.separator.join([*solved, row["context"]])


def load_task(path: str | Path) -> Task:
    """The task of a YAML file; DataError naming the file (and line) for anything malformed."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read task {path}: {e}") from None
    if not isinstance(spec, dict) or not {"name", "kind", "data"} <= set(spec):
        raise DataError(f"task {path} must be a mapping with name, kind and data")
    known = {f.name for f in dataclasses.fields(Task)} - {"rows", "shots"} | {"data", "fewshot"}
    if unknown := set(spec) - known:
        raise DataError(f"task {path}: unknown keys {sorted(unknown)}")
    if spec["kind"] not in KINDS:
        raise DataError(f"task {path}: kind must be one of {KINDS}, got {spec['kind']!r}")
    if spec.get("metric", "acc_norm") not in ("acc", "acc_norm", "acc_bytes"):
        raise DataError(f"task {path}: metric must be acc, acc_norm or acc_bytes, got {spec['metric']!r}")
    rows = []
    for where, row in read_jsonl(path.parent / spec["data"]):
        need = ("context", "choices", "answer") if spec["kind"] == "multiple_choice" else ("context", "target")
        if not isinstance(row, dict) or not set(need) <= set(row):
            raise DataError(f"{where}: a {spec['kind']} row needs {', '.join(need)}")
        if spec["kind"] == "multiple_choice" and not (
                isinstance(row["choices"], list) and len(row["choices"]) >= 2
                and isinstance(row["answer"], int) and 0 <= row["answer"] < len(row["choices"])):
            raise DataError(f"{where}: choices must be a list of at least 2 and answer an index into it")
        rows.append(row)
    shots = [r for r in rows if r.get("split") == "fewshot"][:int(spec.get("fewshot", 0))]
    settings = {k: v for k, v in spec.items() if k not in ("data", "fewshot")}
    if "until" in settings:
        settings["until"] = tuple(settings["until"])
    return Task(rows=[r for r in rows if r.get("split") != "fewshot"], shots=shots, **settings)


def find_tasks(names: Sequence[str], tasks_dir: str | Path | None = None) -> list[Task]:
    """The tasks called `names` among the built-in ones and those of `tasks_dir` (which win on a name clash)."""
    available = {}
    for directory in (BUILTIN, *([Path(tasks_dir)] if tasks_dir else [])):
        for path in sorted(Path(directory).glob("*.yaml")):
            task = load_task(path)
            available[task.name] = task
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"unknown task(s) {missing}; available: {sorted(available)}")
    return [available[n] for n in names]


def run_multiple_choice(task: Task, scorer: LoglikScorer, tokenizer, limit: int | None = None) -> dict:
    """acc, acc_norm, chance, centered and the number of questions of `task`'s first `limit` rows."""
    rows = task.rows[:limit]
    requests, spans = [], []
    for row in rows:
        context = task.prompt(row)
        context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
        spans.append((len(requests), len(row["choices"])))
        for choice in row["choices"]:
            whole = [tokenizer.bos_id] + tokenizer.encode(context + task.delimiter + choice)
            requests.append((context_ids, whole[len(context_ids):]))
    scores = np.array([s for s, _ in scorer.score(requests)])
    acc = acc_norm = acc_bytes = chance = 0.0
    for row, (start, n) in zip(rows, spans, strict=True):
        logliks = scores[start:start + n]
        chars = np.array([max(len(c), 1) for c in row["choices"]])
        nbytes = np.array([max(len(c.encode()), 1) for c in row["choices"]])
        acc += int(np.argmax(logliks) == row["answer"])
        acc_norm += int(np.argmax(logliks / chars) == row["answer"])
        acc_bytes += int(np.argmax(logliks / nbytes) == row["answer"])
        chance += 1 / n
    n = max(len(rows), 1)
    out = {"acc": acc / n, "acc_norm": acc_norm / n, "acc_bytes": acc_bytes / n, "chance": chance / n}
    return {**out, "centered": (out[task.metric] - out["chance"]) / (1 - out["chance"]), "questions": len(rows)}


def run_generation(task: Task, sampler: Sampler, limit: int | None = None, batch_size: int = 16) -> dict:
    """exact_match and rouge_l of greedy replies to the first `limit` rows of `task` that leave room for a reply in
    the model's context; centered = exact_match."""
    tokenizer = sampler.tokenizer
    prompts = [encode_chat([{"role": "user", "content": task.prompt(r)}], tokenizer, add_generation_prompt=True)[0]
               .tolist() if task.chat else [tokenizer.bos_id] + tokenizer.encode(task.prompt(r)) for r in task.rows]
    kept = [(r, p) for r, p in zip(task.rows, prompts, strict=True) if len(p) + 8 <= sampler.max_len][:limit]
    if not kept:
        raise DataError(f"no question of task {task.name} fits the model's context of {sampler.max_len}")
    rows, prompts = [r for r, _ in kept], [p for _, p in kept]
    replies = []
    for start in range(0, len(prompts), batch_size):  # full batches: one compiled decode step
        batch = prompts[start:start + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        replies += sampler.generate([], task.max_tokens, temperature=0.0, stop=task.until,
                                    prompt_ids=padded)[:len(batch)]
    metrics = score_replies([r.strip() for r in replies], [r["target"] for r in rows])
    return {**metrics, "chance": 0.0, "centered": metrics["exact_match"]}


def evaluate_tasks(workdir: str | Path, names: Sequence[str], tasks_dir: str | Path | None = None,
                   limit: int | None = None, step: int | None = None) -> dict[str, dict]:
    """Each named task's metrics on checkpoint `step` (default latest) of the run `workdir`, plus "mean" (the
    mean centered score over them)."""
    tasks = find_tasks(names, tasks_dir)
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(workdir), step)
    scorer = LoglikScorer(graphdef, params, cfg.model.seq_len)
    sampler = Sampler(cfg.model, graphdef, params, tokenizer)
    results = {t.name: run_multiple_choice(t, scorer, tokenizer, limit) if t.kind == "multiple_choice"
               else run_generation(t, sampler, limit) for t in tasks}
    results["mean"] = {"centered": float(np.mean([r["centered"] for r in results.values()]))}
    return results
