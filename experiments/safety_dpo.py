"""Safety DPO: preference pairs that contrast refusing with answering, on the embedded safety requests.

    python experiments/safety_dpo.py --sft runs/quickstart/sft --out runs/safety_dpo [--config train.lr=1e-4] \\
        [--config train.dpo_nll=1.0]

Fine-tuning on the safety examples alone (`lmjax.corpus.safety_chat`, inside the embedded chat data) teaches
refusals and look-alike answers side by side; this tries whether an explicit contrast teaches the difference
better. For every phrasing of every training request it writes one pair:
- a harmful request: chosen = one of its category's refusals, rejected = an answer to one of the category's
  look-alikes (a fluent reply that does what was asked instead of refusing);
- a benign look-alike: chosen = its answer, rejected = one of its category's refusals.
Then it runs DPO (`configs/dpo_tiny.py`, the pairs of 10% of the prompts held out) from the SFT run and measures
refusal and over-refusal on the held-out requests (`lmjax eval safety`) and chat ROUGE-L on held-out questions.
The held-out safety requests are never in the pairs. Prints one JSON line of results.
"""

import argparse
import json
import random
from pathlib import Path

from lmjax.config import apply_overrides, load_config
from lmjax.corpus.safety_chat import safety_prompts
from lmjax.corpus.safety_phrasings import CATEGORIES
from lmjax.eval.chat_qa import evaluate_workdir
from lmjax.eval.safety import evaluate_safety, format_safety
from lmjax.text.io import write_jsonl
from lmjax.train.loop import train


def safety_pairs(seed: int) -> list[dict]:
    """One preference pair per training phrasing of every safety request (see the module docstring)."""
    rng = random.Random(seed)
    pairs = []
    for p in safety_prompts("train"):
        refusal = rng.choice(CATEGORIES[p.category]["refusals"])
        answer = p.answer or rng.choice(list(CATEGORIES[p.category]["benign"].values()))
        chosen, rejected = (answer, refusal) if p.kind == "benign" else (refusal, answer)
        pairs.append({"prompt": [{"role": "user", "content": p.prompt}], "chosen": chosen, "rejected": rejected})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="runs/quickstart/sft", help="the chat-tuned run")
    parser.add_argument("--out", default="runs/safety_dpo", help="directory for the pairs and the DPO run")
    parser.add_argument("--seed", type=int, default=0, help="draws refusals and rejected answers")
    parser.add_argument("--config", action="append", default=[], help="DPO config override KEY=VALUE (repeatable)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = out / "pairs.jsonl"
    write_jsonl(safety_pairs(args.seed), pairs)
    overrides = [f"init_from={args.sft}", f"data.train=pairs:{pairs}", "train.steps=200", "train.batch_size=16",
                 *args.config]
    result = train(apply_overrides(load_config(Path(__file__).parents[1] / "configs" / "dpo_tiny.py"), overrides),
                   out / "dpo")
    safety = evaluate_safety(str(out / "dpo"))
    print(format_safety(safety))
    rouge, _ = evaluate_workdir(str(out / "dpo"))
    print(json.dumps({"overrides": overrides[2:], "val_accuracy": result.get("val_accuracy"),
                      "refusal": safety["overall"]["refusal"], "over_refusal": safety["overall"]["over_refusal"],
                      "rouge_l": rouge["rouge_l"], "failures": safety["failures"]}))


if __name__ == "__main__":
    main()
