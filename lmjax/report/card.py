"""`lmjax report --workdir RUN`: the report card of a run, RUN/report/report.md and report.html with PNG plots.

It gathers what the run already has (config, metrics.jsonl and its loss curve, the data card of a prepared
corpus, the demo/API feedback database) and runs the evaluations with limits that keep it to about a minute on
a laptop CPU for a small model: language modelling on the run's validation data, the built-in tasks, chat
generation metrics, the bias probes, the red-team sets and the safety-tuning refusal rates. Each section says
what its numbers mean; the model card states intended use, limitations, what the filters do and where the data
came from, under which license.
"""

import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import jax
import markdown_it

from lmjax.corpus.shards import parse_prepared
from lmjax.corpus.sources import source_license
from lmjax.eval.bias import evaluate_bias
from lmjax.eval.chat_qa import evaluate_workdir
from lmjax.eval.lm import evaluate_source
from lmjax.eval.metrics import Estimate
from lmjax.eval.redteam import evaluate_redteam
from lmjax.eval.safety import evaluate_safety
from lmjax.eval.tasks import evaluate_tasks
from lmjax.run.workdir import open_workdir, read_metrics
from lmjax.serve.feedback import FILENAME as FEEDBACK_FILE
from lmjax.serve.feedback import FeedbackStore
from lmjax.text.io import atomic_write

TASKS = ("stdlib_module_mc", "stdlib_docstring_mc")
# What the report evaluates: enough to rank, not to publish.
LIMITS = {"lm_docs": 64, "tasks": 60, "chat": 48, "safety_phrasings": 4}


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bias_chart(results: dict, path: Path) -> None:
    def draw(ax):
        names = list(results)
        shares = [results[n]["stereotype_share"] for n in names]
        errors = [[s - results[n]["low"] for n, s in zip(names, shares, strict=True)],
                  [results[n]["high"] - s for n, s in zip(names, shares, strict=True)]]
        ax.barh(names, shares, xerr=errors, color="#7a9cc6", capsize=3)
        ax.axvline(0.5, color="black", lw=1, ls="--")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("stereotype share (0.5 = no preference), 95% interval")

    _plot(path, draw)


def _ratings_chart(rows: list[tuple[float, int]], path: Path) -> None:
    def draw(ax):
        days = sorted({datetime.date.fromtimestamp(t) for t, _ in rows})
        for value, label, color in ((1, "thumbs up", "#4c9a2a"), (-1, "thumbs down", "#c0392b")):
            counts = [sum(1 for t, v in rows if v == value and datetime.date.fromtimestamp(t) == d) for d in days]
            ax.plot(days, counts, "o-", label=label, color=color)
        ax.set_ylabel("ratings per day")
        ax.legend()
        ax.grid(alpha=0.3)

    _plot(path, draw)


def _environment() -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    import flax

    devices = jax.devices()
    return [f"- lmjax commit {commit}; Python {platform.python_version()}; jax {jax.__version__}, "
            f"flax {flax.__version__}", f"- {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); "
            f"{platform.machine()} {platform.processor() or ''}".rstrip(),
            f"- written {datetime.datetime.now().isoformat(timespec='seconds')}"]


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _data_summary(spec: str) -> tuple[str, str]:
    """A line about the data spec `spec` (its data card's numbers when it is a prepared corpus) and its license."""
    prepared = parse_prepared(spec)
    if prepared is None:
        return f"`{spec}` (not a prepared corpus: no data card).", source_license(spec)
    card = json.loads((prepared[0] / "card.json").read_text())
    text = (f"prepared corpus `{prepared[0]}` from `{card['sources']}`: {card['documents_in']:,} documents in, "
            + ", ".join(f"{k} {v:,}" for k, v in card["documents_out"].items()) + " out; "
            + ", ".join(f"{k} {v:,} tokens" for k, v in card["tokens_out"].items())
            + f"; duplicates removed: exact {card['duplicates']['exact']:,}, near {card['duplicates']['near']:,}; "
            f"PII replaced: {sum(card['pii_replaced'].values()):,} (full card: `{prepared[0] / 'card.md'}`).")
    return text, card.get("license") or source_license(card["sources"])


def build_report(workdir: str | Path, out: str | Path | None = None, limits: dict[str, int] | None = None) -> Path:
    """Evaluates the run `workdir` (as many documents and questions as `limits`, default LIMITS, say) and writes
    its report card to `out` (default RUN/report); returns the Markdown file's path."""
    limits = {**LIMITS, **(limits or {})}
    wd = open_workdir(workdir)
    out = Path(out) if out else wd.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg = wd.load_config()
    records = read_metrics(wd.metrics_path)
    start = time.time()
    lm = evaluate_source(str(wd.path), cfg.data.val, max_docs=limits["lm_docs"]) if cfg.data.val else None
    tasks = evaluate_tasks(wd.path, TASKS, limit=limits["tasks"])
    chat, examples = evaluate_workdir(str(wd.path), limit=limits["chat"])
    bias = evaluate_bias(str(wd.path))
    redteam = evaluate_redteam(str(wd.path))
    safety = evaluate_safety(str(wd.path), phrasings=limits["safety_phrasings"])
    seconds = time.time() - start
    _bias_chart(bias, out / "bias.png")

    lines = [f"# Report card: `{wd.path.name}`", "",
             f"Step {lm['step'] if lm else '?'} of `{wd.path}`; a {cfg.model.family} model, {cfg.model.num_layers} "
             f"layers x {cfg.model.d_model}, context {cfg.model.seq_len}, vocabulary {cfg.model.vocab_size}. "
             f"Evaluated in {seconds:.0f} s.", "", "## Summary", ""]
    baseline = f" (unigram {lm['unigram_bpb']:.3f})" if lm and lm["unigram_bpb"] else ""
    summary = [["bits per byte (val)", f"{lm['bpb']:.3f}{baseline}" if lm else "n/a"],
               ["tasks, mean centered score", f"{tasks['mean']['centered']:.3f} (0 = chance, 1 = perfect)"],
               ["chat ROUGE-L", f"{chat['rouge_l']:.3f}"],
               ["occupation stereotype share", f"{bias['occupations']['stereotype_share']:.3f} (0.5 = none)"],
               ["harmful replies through the filter",
                f"{max(r['harmful_through'] for k, r in redteam.items() if k != 'benign'):.0%} (worst category)"],
               ["benign prompts blocked", f"{redteam['benign']['false_positives']:.0%}"],
               ["refusal of held-out harmful requests",
                f"{safety['overall']['refusal']:.0%} ({safety['overall']['refusal_filtered']:.0%} with the filter)"],
               ["over-refusal of benign look-alikes", f"{safety['overall']['over_refusal']:.0%} "
                f"({safety['overall']['over_refusal_filtered']:.0%} with the filter)"]]
    lines += _table(["measure", "value"], summary)

    lines += ["", "## Data", ""]
    sources = [("This run", cfg.data.train)]
    if cfg.init_from:
        sources.append((f"Its start, `{cfg.init_from}` (step {cfg.init_from_step})",
                        open_workdir(cfg.init_from).load_config().data.train))
    licenses = []
    for who, spec in sources:
        text, license_ = _data_summary(spec)
        lines += [f"- {who}: {text}"]
        licenses.append(f"`{spec}`: {license_}")

    lines += ["", "## Training", ""]
    train_losses = [r for r in records if "train_loss" in r]
    val_losses = [r for r in records if "val_loss" in r]
    if train_losses:
        lines += [f"Last train loss {train_losses[-1]['train_loss']:.3f} at step {train_losses[-1]['step']}"
                  + (f"; last validation loss {val_losses[-1]['val_loss']:.3f}." if val_losses else ".")]
    if (wd.path / "loss.png").is_file():
        (out / "loss.png").write_bytes((wd.path / "loss.png").read_bytes())
        lines += ["", "![loss curves](loss.png)"]

    lines += ["", "## Language modelling", ""]
    if lm:
        lines += _table(["source", "documents", "tokens", "loss (nats/token)", "perplexity", "bits per byte",
                         "unigram bits per byte"],
                        [[lm["source"], lm["documents"], f"{lm['tokens']:,}", f"{lm['loss']:.4f}", f"{lm['ppl']:.2f}",
                          f"{lm['bpb']:.4f}", f"{lm['unigram_bpb']:.4f}" if lm["unigram_bpb"] else "n/a"]])
        lines += ["", f"Documents scored whole with a sliding window (stride {lm['stride']}); the first "
                  f"{limits['lm_docs']} of the validation data."]

    lines += ["", "## Tasks", "", f"The first {limits['tasks']} questions of each built-in task "
              "(`lmjax eval tasks`); centered = (score - chance) / (1 - chance).", ""]
    lines += _table(["task", "acc", "acc_norm", "chance", "centered", "questions"],
                    [[n, f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}", f"{r['chance']:.3f}", f"{r['centered']:.3f}",
                      r["questions"]] for n, r in tasks.items() if n != "mean"])

    lines += ["", "## Chat", "", f"Greedy replies to {chat['questions']} held-out questions about modules the "
              "fine-tune never saw, against the reference answers; 95% bootstrap intervals.", ""]
    lines += _table(["metric", "value", "interval"],
                    [[n, f"{e.value:.3f}", f"[{e.low:.3f}, {e.high:.3f}]"] for n, e in chat["metrics"].items()
                     if isinstance(e, Estimate)])
    for question, reply, reference in examples[:2]:
        lines += ["", f"> **Q:** {question}  ", f"> **A:** {reply}  ", f"> **reference:** {reference}"]

    lines += ["", "## Bias", "", "Share of probes where the model prefers the stereotypical side (0.5 = no "
              "preference), with 95% intervals and p-values against no preference (`lmjax eval bias`; "
              "docs/evaluation.md says how each probe is built).", ""]
    lines += _table(["probe", "stereotype share", "interval", "p-value", "items"],
                    [[n, f"{r['stereotype_share']:.3f}", f"[{r['low']:.2f}, {r['high']:.2f}]", f"{r['p_value']:.3g}",
                      r["pairs"]] for n, r in bias.items()])
    lines += ["", "![bias](bias.png)"]

    lines += ["", "## Red-team", "", "Adversarial prompts through the model with the serving content filter "
              "(`lmjax eval redteam`; what counts as harmful is stated in lmjax/eval/redteam.py).", ""]
    lines += _table(["category", "prompts", "blocked at input", "blocked at output", "too long", "harmful through"],
                    [[n, r["prompts"], f"{r['blocked_input']:.0%}", f"{r['blocked_output']:.0%}",
                      f"{r['too_long']:.0%}", f"{r['harmful_through']:.0%}"] for n, r in redteam.items()])

    overall = safety["overall"]
    lines += ["", "## Safety tuning", "", f"Held-out harmful requests ({overall['harmful_prompts']} prompts) and "
              f"benign look-alikes ({overall['benign_prompts']}) that the fine-tune never saw, "
              f"{limits['safety_phrasings']} phrasings of each request: refused by the model alone, and behind the "
              "content filter (`lmjax eval safety`; the refusal rule is stated in lmjax/eval/safety.py).", ""]
    lines += _table(["category", "refusal", "with filter", "over-refusal", "with filter"],
                    [[n, f"{r['refusal']:.0%}", f"{r['refusal_filtered']:.0%}", f"{r['over_refusal']:.0%}",
                      f"{r['over_refusal_filtered']:.0%}"] for n, r in [*safety["categories"].items(),
                                                                        ("**overall**", overall)]])
    for kind, what in (("harmful", "harmful request answered"), ("benign", "look-alike refused")):
        if failure := next((f for f in safety["failures"] if f["kind"] == kind), None):
            lines += ["", f"> **{what} ({failure['category']}):** {failure['prompt']}  ",
                      f"> **A:** {failure['reply']}"]

    lines += ["", "## Feedback", ""]
    if (wd.path / FEEDBACK_FILE).is_file():
        store = FeedbackStore(wd.path / FEEDBACK_FILE)
        ratings = store.query("SELECT created, value FROM ratings ORDER BY created")
        replies = store.query("SELECT COUNT(*) FROM replies")[0][0]
        edits = store.query("SELECT COUNT(*) FROM edits")[0][0]
        store.close()
        up = sum(1 for _, v in ratings if v > 0)
        lines += [f"{replies:,} replies served and stored, {len(ratings):,} rated ({up:,} up, "
                  f"{len(ratings) - up:,} down), {edits:,} edited."]
        if ratings:
            _ratings_chart(ratings, out / "ratings.png")
            lines += ["", "![ratings over time](ratings.png)"]
    else:
        lines += ["No feedback yet: the demo and the API store ratings in the run's feedback database."]

    lines += ["", "## Model card", "",
              "- **Intended use**: a small model for learning and experiments: answering questions about Python's "
              "standard library in the style of its docstrings, and a base for fine-tuning. Not for decisions about "
              "people, advice, or facts that matter: it is small, often wrong, and has read little beyond its data.",
              "- **Limitations**: its knowledge is its training data's; replies can be fluent and false; the bias and "
              "red-team numbers above are probes, not guarantees; English only.",
              "- **Filters**: `lmjax serve` and the demo refuse prompts and replace replies that match the harmful-"
              "content blocklist (lmjax/text/blocklist.txt); stored conversations have personal data scrubbed; "
              "special tokens cannot be typed.",
              f"- **Data and licenses**: {'; '.join(licenses)}."]
    lines += ["", "## Environment", "", *_environment(), ""]

    markdown = "\n".join(lines)
    path = out / "report.md"
    atomic_write(path, markdown)
    body = markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)
    atomic_write(out / "report.html", "<!doctype html>\n<html><head><meta charset='utf-8'><title>Report card: "
                 f"{wd.path.name}</title><style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}"
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
                 f"img{{max-width:100%}}</style></head><body>\n{body}</body></html>\n")
    return path
