"""Robustness ablation: chat fine-tuning of the quickstart's pretrained model with each adversarial training method,
at matched steps and at matched wall-clock time, measured by `lmjax eval robust`.

    python experiments/quickstart.py --no-demo          # once: makes runs/quickstart/pretrain
    python tools/bench/adversarial_cost.py --json runs/robustness/costs.json   # each method's step cost
    python experiments/robustness.py [--pretrained runs/quickstart/pretrain] [--out runs/robustness] \
        [--costs runs/robustness/costs.json] [--steps N] [--questions 128]

Every run is configs/sft_tiny.py from the same pretrained weights with one `train.adversarial` setting (below,
chosen a priori from the papers' defaults in lmjax's units, not tuned here). Matched steps: every method trains
`--steps` steps (default: sft_tiny's own). Matched wall-clock: a method that costs c plain steps per step trains
round(steps / c) steps, c from tools/bench/adversarial_cost.py (`--costs`: its methods timed in interleaved rounds
on this model's shapes, so a busy machine slows them alike; the runs' own throughput is not used, since other jobs
come and go).
Each run is scored by `evaluate_robust` (lmjax/eval/robust.py): clean and perturbed-prompt
ROUGE-L at three strengths, held-out loss clean / random / PGD at eps 0.1, and the red-team attack success rate.
Results go to OUT/results.json and a markdown table (OUT/results.md). Every run and score resumes.
"""

import argparse
import json
from pathlib import Path

from lmjax.config import apply_overrides, load_config
from lmjax.eval.robust import evaluate_robust, summary
from lmjax.train.loop import train

METHODS = {  # name -> train.adversarial overrides
    "none": [],
    "neftune": ["method=neftune", "alpha=5"],
    "pgd": ["method=pgd", "steps=1", "eps=0.1", "alpha=0.1", "weight=0.5"],
    "freelb": ["method=freelb", "steps=2", "eps=0.1", "alpha=0.05", "init=random"],
    "smart": ["method=smart", "steps=1", "eps=0.1", "alpha=0.05", "weight=1"],
}
BENCH_NAMES = {"none": "plain", "neftune": "neftune", "pgd": "pgd K=1 w=0.5", "freelb": "freelb K=2",
               "smart": "smart K=1"}  # the same settings in tools/bench/adversarial_cost.py
EPS, STRENGTHS, MIDDLE = (0.1,), (0.1, 0.2, 0.4), 0.2


def finetune(pretrained: str, method: str, steps: int, workdir: Path, data: list[str]) -> Path:
    """The SFT run of `method` for `steps` steps on `data` (data.* overrides; resumes what is unfinished, and a
    scored run is done)."""
    if (workdir / "robust.json").exists():
        return workdir
    overrides = [f"init_from={pretrained}", f"train.steps={steps}", "train.ckpt_every=1000", *data]
    overrides += [f"train.adversarial.{o}" for o in METHODS[method]]
    train(apply_overrides(load_config("configs/sft_tiny.py"), overrides), workdir)
    return workdir


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
    parser.add_argument("--steps", type=int, default=None, help="SFT steps at matched steps (default: sft_tiny's)")
    parser.add_argument("--costs", default="runs/robustness/costs.json",
                        help="tools/bench/adversarial_cost.py --json output: each method's cost in plain steps")
    parser.add_argument("--questions", type=int, default=128,
                        help="held-out chat questions scored (the quickstart's count)")
    parser.add_argument("--train", default="chat:stdlib", help="data.train of every run")
    parser.add_argument("--val", default="chat:stdlib:heldout", help="data.val of every run (also the questions)")
    args = parser.parse_args()
    if not (Path(args.pretrained) / "checkpoints").is_dir():
        raise SystemExit(f"{args.pretrained} is not a trained run: run `python experiments/quickstart.py --no-demo` "
                         "first, or pass --pretrained")
    if not Path(args.costs).is_file():
        raise SystemExit(f"no step costs at {args.costs}: run `python tools/bench/adversarial_cost.py --json "
                         f"{args.costs}` first")
    costs = json.loads(Path(args.costs).read_text())
    args.steps = args.steps or load_config("configs/sft_tiny.py").train.steps
    out, data = Path(args.out), [f"data.train={args.train}", f"data.val={args.val}"]
    rows = []
    for method in METHODS:
        run = finetune(args.pretrained, method, args.steps, out / f"{method}-steps", data)
        rows.append({"run": f"{method} (steps)", "steps": args.steps, "cost": costs[BENCH_NAMES[method]],
                     "scores": score(run, args.questions)})
    for method, row in zip(list(METHODS)[1:], rows[1:], strict=True):
        steps = round(args.steps / row["cost"])
        if abs(steps - args.steps) <= args.steps // 20:
            continue  # no dearer than a plain step: its matched-step run is also its matched-time run
        run = finetune(args.pretrained, method, steps, out / f"{method}-time", data)
        rows.append({"run": f"{method} (time)", "steps": steps, "cost": row["cost"],
                     "scores": score(run, args.questions)})
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
