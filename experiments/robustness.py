"""Robustness ablation: chat fine-tuning of the quickstart's pretrained model with each adversarial training method,
at matched steps and at matched wall-clock time, measured by `lmjax eval robust`.

    python experiments/quickstart.py --no-demo          # once: makes runs/quickstart/pretrain
    python experiments/robustness.py [--pretrained runs/quickstart/pretrain] [--out runs/robustness]

Every run is configs/sft_tiny.py from the same pretrained weights with one `train.adversarial` setting (below,
chosen a priori from the papers' defaults in lmjax's units, not tuned here). Matched steps: every method trains
`--steps` steps. Matched wall-clock: a method that costs c plain steps per step trains round(steps / c) steps,
with c measured from the matched-step runs' own throughput (runs of this script are sequential, so they share
the machine alike). Each run is scored by `evaluate_robust` (lmjax/eval/robust.py): clean and perturbed-prompt
ROUGE-L at three strengths, held-out loss clean / random / PGD at eps 0.1, and the red-team attack success rate.
Results go to OUT/results.json and a markdown table (OUT/results.md). Every run and score resumes.
"""

import argparse
import json
import statistics
from pathlib import Path

from lmjax.config import apply_overrides, load_config
from lmjax.eval.robust import evaluate_robust, summary
from lmjax.run.workdir import Workdir, read_metrics
from lmjax.train.loop import train

METHODS = {  # name -> train.adversarial overrides
    "none": [],
    "neftune": ["method=neftune", "alpha=5"],
    "pgd": ["method=pgd", "steps=1", "eps=0.1", "alpha=0.1", "weight=0.5"],
    "freelb": ["method=freelb", "steps=2", "eps=0.1", "alpha=0.05", "init=random"],
    "smart": ["method=smart", "steps=1", "eps=0.1", "alpha=0.05", "weight=1"],
}
EPS, STRENGTHS, MIDDLE = (0.1,), (0.1, 0.2, 0.4), 0.2


def finetune(pretrained: str, method: str, steps: int, workdir: Path) -> Path:
    """The SFT run of `method` for `steps` steps (resumes or skips what is done)."""
    overrides = [f"init_from={pretrained}", f"train.steps={steps}", "train.ckpt_every=1000"]
    overrides += [f"train.adversarial.{o}" for o in METHODS[method]]
    train(apply_overrides(load_config("configs/sft_tiny.py"), overrides), workdir)
    return workdir


def seconds_per_step(workdir: Path) -> float:
    """Median training seconds per step over the run's logged intervals (evaluation excluded)."""
    wd = Workdir(workdir)
    cfg = wd.load_config()
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    records = [r for r in read_metrics(wd.metrics_path) if "tokens_per_sec" in r]
    return statistics.median(tokens_per_step / r["tokens_per_sec"] for r in records)


def score(workdir: Path, questions: int) -> dict:
    """`evaluate_robust`'s summary of the run, cached in WORKDIR/robust.json."""
    path = workdir / "robust.json"
    if not path.exists():
        result = evaluate_robust(str(workdir), eps=EPS, strengths=STRENGTHS, attack_steps=3, questions=questions)
        path.write_text(json.dumps(summary(result), indent=1))
    return json.loads(path.read_text())


def table(rows: list[dict]) -> str:
    """The markdown table of the ablation."""
    head = ("| run | steps | cost (x plain step) | clean ROUGE-L | " + " | ".join(f"ROUGE-L @{s}" for s in STRENGTHS)
            + f" | @{MIDDLE} vs plain | clean loss | random loss @0.1 | PGD loss @0.1 | attack success |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    plain = next(r for r in rows if r["run"] == "none (steps)")
    for r in rows:
        s = r["scores"]
        gain = s[f"rouge_l@{MIDDLE}"] / max(plain["scores"][f"rouge_l@{MIDDLE}"], 1e-9) - 1
        lines.append(f"| {r['run']} | {r['steps']} | {r['cost']:.2f} | {s['rouge_l']:.3f} | "
                     + " | ".join(f"{s[f'rouge_l@{x}']:.3f}" for x in STRENGTHS)
                     + f" | {100 * gain:+.1f}% | {s['clean_loss']:.3f} | {s['random_loss@0.1']:.3f} | "
                     f"{s['pgd_loss@0.1']:.3f} | {100 * s['attack_success_rate']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="runs/quickstart/pretrain", help="the pretrained run to fine-tune")
    parser.add_argument("--out", default="runs/robustness", help="directory of the runs and results")
    parser.add_argument("--steps", type=int, default=200, help="SFT steps at matched steps")
    parser.add_argument("--questions", type=int, default=64, help="held-out chat questions scored")
    args = parser.parse_args()
    if not (Path(args.pretrained) / "checkpoints").is_dir():
        raise SystemExit(f"{args.pretrained} is not a trained run: run `python experiments/quickstart.py --no-demo` "
                         "first, or pass --pretrained")
    out = Path(args.out)
    rows = []
    for method in METHODS:
        run = finetune(args.pretrained, method, args.steps, out / f"{method}-steps")
        rows.append({"run": f"{method} (steps)", "steps": args.steps, "cost": seconds_per_step(run),
                     "scores": score(run, args.questions)})
    plain_s = rows[0]["cost"]
    for row in rows:
        row["cost"] /= plain_s
    for method, row in zip(list(METHODS)[1:], rows[1:], strict=True):
        steps = round(args.steps / row["cost"])
        if abs(steps - args.steps) <= args.steps // 20:
            continue  # no dearer than a plain step: its matched-step run is also its matched-time run
        run = finetune(args.pretrained, method, steps, out / f"{method}-time")
        rows.append({"run": f"{method} (time)", "steps": steps, "cost": row["cost"],
                     "scores": score(run, args.questions)})
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
