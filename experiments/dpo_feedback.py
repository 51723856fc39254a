"""DPO from demo feedback, end to end, with a scripted user in place of people clicking thumbs.

    python experiments/dpo_feedback.py --sft runs/quickstart/sft [--out runs/quickstart/dpo_feedback]

In real use people rate replies in `lmjax demo --workdir runs/sft`, then `lmjax feedback export` and a
`configs/dpo_tiny.py` run close the loop. To measure that loop without people, this script:
1. lets the chat-tuned model answer each question of the embedded chat data twice (temperature 1);
2. plays a user who likes the reply closer to the dataset's reference answer (ROUGE-L) and dislikes the
   other (near-ties are skipped), recording replies and votes in a feedback database exactly as the demo
   does (`FeedbackStore`);
3. exports preference pairs with `export_preferences` (questions about training modules for DPO,
   questions about held-out modules for evaluation);
4. runs DPO (`configs/dpo_tiny.py`) from the SFT run;
5. reports, on the held-out pairs, how often the SFT and the DPO model give the liked reply the higher
   log-probability, DPO's implicit-reward accuracy, and greedy ROUGE-L of both on held-out questions.

Simplification: the scripted user's taste is "closer to the reference answer", a stand-in for people.
"""

import argparse
import json
import random
import time
from pathlib import Path

import jax
import numpy as np
from rouge_score import rouge_scorer

from lmjax.config import apply_overrides, load_config
from lmjax.eval.chat_qa import evaluate_workdir, qa_pairs
from lmjax.input.pairs import SIDES, encode_pairs
from lmjax.input.specs import read_chat
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir
from lmjax.serve.engine import ChatEngine
from lmjax.serve.feedback import FeedbackStore, export_preferences
from lmjax.text.io import read_jsonl, write_jsonl
from lmjax.train.dpo import sequence_logprobs
from lmjax.train.loop import train

BATCH = 16  # questions answered per sampling call (each twice)
MIN_GAP = 0.05  # ROUGE-L difference below which the scripted user rates neither reply


def collect_feedback(engine: ChatEngine, questions: list[tuple[list[dict], str]], store: FeedbackStore,
                     session: str, seed: int) -> int:
    """Two sampled replies per question, rated by closeness to the reference; returns the number of pairs."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = 0
    for start in range(0, len(questions), BATCH):
        batch = questions[start:start + BATCH]
        ids = [engine.prompt_ids(prompt, max_new_tokens=48) for prompt, _ in batch]
        replies = engine.generate(ids + ids, 48, temperature=1.0, top_p=0.95,
                                  seeds=[seed + 2 * (start + row) + k for k in range(2) for row in range(len(ids))])
        for row, (prompt, reference) in enumerate(batch):
            texts = [replies[k * len(ids) + row] for k in range(2)]
            scores = [scorer.score(reference, t)["rougeL"].fmeasure for t in texts]
            reply_ids = [store.record_reply(prompt, t, engine.step, {"temperature": 1.0}, session) for t in texts]
            if texts[0] != texts[1] and abs(scores[0] - scores[1]) >= MIN_GAP:
                better = int(scores[1] > scores[0])
                store.rate(reply_ids[better], 1)
                store.rate(reply_ids[1 - better], -1)
                pairs += 1
    return pairs


def likelihood_accuracy(workdir: Path, pairs: list[dict]) -> float:
    """Share of pairs whose liked reply gets the higher log-probability under the run's latest parameters."""
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(workdir))
    rows, _ = encode_pairs(pairs, tokenizer, cfg.model.seq_len)
    logprobs = jax.jit(lambda p, batch: sequence_logprobs(p, graphdef, batch))
    correct = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        side = {s: logprobs(params, {k: np.stack([r[f"{s}_{k}"] for r in chunk]) for k in
                                     ("inputs", "targets", "segment_ids", "positions", "loss_mask")})
                for s in SIDES}
        correct += list(np.asarray(side["chosen"] > side["rejected"]))
    return float(np.mean(correct))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="runs/quickstart/sft", help="the chat-tuned run")
    parser.add_argument("--out", default="runs/quickstart/dpo_feedback", help="directory for feedback and DPO run")
    parser.add_argument("--train-questions", type=int, default=2048, help="training questions to collect on")
    parser.add_argument("--heldout-questions", type=int, default=512, help="held-out questions to collect on")
    parser.add_argument("--seed", type=int, default=0, help="question order and sampling seed")
    parser.add_argument("--run", default="dpo", help="name of the DPO run directory inside --out")
    parser.add_argument("--config", action="append", default=[], help="DPO config override KEY=VALUE (repeatable)")
    args = parser.parse_args()
    out, start = Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)

    engine = ChatEngine.from_workdir(args.sft)
    files = {}
    for split, spec, limit in (("train", "stdlib:train", args.train_questions),
                               ("heldout", "stdlib:heldout", args.heldout_questions)):
        files[split] = out / f"prefs_{split}.jsonl"
        if files[split].is_file():
            continue
        questions = qa_pairs(read_chat(spec))
        random.Random(args.seed).shuffle(questions)
        store = FeedbackStore(out / f"feedback_{split}.sqlite")
        n = collect_feedback(engine, questions[:limit], store, f"scripted-{split}", args.seed)
        store.close()
        pairs = export_preferences(store.path)
        write_jsonl(pairs, files[split])
        print(f"[{time.time() - start:4.0f}s] {split}: {min(limit, len(questions))} questions, {n} rated pairs "
              f"-> {files[split]}", flush=True)

    cfg = apply_overrides(load_config("configs/dpo_tiny.py"), [
        f"init_from={args.sft}", f"data.train=pairs:{files['train']}", f"data.val=pairs:{files['heldout']}",
        *args.config])
    run = out / args.run
    result = train(cfg, run)
    heldout = [pair for _, pair in read_jsonl(files["heldout"])]
    report = {
        "heldout_pairs": len(heldout),
        "sft_likelihood_accuracy": likelihood_accuracy(Path(args.sft), heldout),
        "dpo_likelihood_accuracy": likelihood_accuracy(run, heldout),
        "dpo_reward_accuracy": result["val_accuracy"],
        "dpo_margin": result["val_margin"],
        "sft_rouge_l": evaluate_workdir(args.sft)[0]["rouge_l"],
        "dpo_rouge_l": evaluate_workdir(str(run))[0]["rouge_l"],
    }
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[{time.time() - start:4.0f}s] held-out pairs: {report['heldout_pairs']}")
    print(f"  liked reply more likely: SFT {report['sft_likelihood_accuracy']:.3f}, "
          f"DPO {report['dpo_likelihood_accuracy']:.3f}")
    print(f"  DPO implicit-reward accuracy {report['dpo_reward_accuracy']:.3f}, margin {report['dpo_margin']:.3f}")
    print(f"  greedy ROUGE-L on held-out questions: SFT {report['sft_rouge_l']:.3f}, DPO {report['dpo_rouge_l']:.3f}")


if __name__ == "__main__":
    main()
