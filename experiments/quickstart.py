"""Quickstart: from nothing to a small chat model running in the browser, on a laptop CPU.

    python experiments/quickstart.py [--out runs/quickstart] [--no-demo]

1. prepares the embedded corpus (docstrings of this Python's standard library + pydoc topics): cleaning,
   deduplication, PII scrubbing, a train/val split, a SentencePiece tokenizer and a data card;
2. pretrains the `tiny` config (4-layer Llama-style, ~5M parameters) on it (4-5 minutes on 2 cores);
3. fine-tunes it on the embedded chat dataset (questions about stdlib modules; 3-5 minutes);
4. asks both models held-out questions about modules never seen in fine-tuning and prints ROUGE-L;
5. writes the chat model's report card (OUT/sft/report/report.md and .html: evaluations, bias, red-team);
6. serves the chat demo on http://127.0.0.1:7860 (thumbs up/down go to OUT/sft/feedback.sqlite).

Every step resumes: running the script again skips what is finished.
"""

import argparse
import time
from pathlib import Path

from lmjax.config import apply_overrides, load_config
from lmjax.corpus.prepare import prepare
from lmjax.corpus.shards import is_prepared
from lmjax.eval.chat_qa import evaluate_workdir
from lmjax.report.card import build_report
from lmjax.train.loop import train


def step(title: str, start: float) -> None:
    print(f"\n[quickstart {time.time() - start:5.0f}s] {title}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="directory for the data and both runs")
    parser.add_argument("--no-demo", action="store_true", help="stop after the evaluation")
    parser.add_argument("--port", type=int, default=7860, help="port of the demo")
    args = parser.parse_args()
    out, start = Path(args.out), time.time()
    data, pretrain, sft = out / "data", out / "pretrain", out / "sft"

    step("1/6 preparing the embedded corpus (seconds)", start)
    card = prepare(load_config("configs/data/stdlib.py"), data) if not is_prepared(data) else None
    if card:
        print(f"  {card['documents_in']:,} documents in, {sum(card['documents_out'].values()):,} kept, "
              f"{card['tokens_out']['train']:,} training tokens; data card: {data / 'card.md'}")

    step("2/6 pretraining configs/tiny.py (4-5 minutes)", start)
    cfg = apply_overrides(load_config("configs/tiny.py"), [f"data.train={data}", f"data.val={data}:val"])
    result = train(cfg, pretrain)
    print(f"  val bits/byte {result['val_bpb']:.3f} vs {result['unigram_bpb']:.3f} for a unigram model")

    step("3/6 chat fine-tuning configs/sft_tiny.py (3-5 minutes)", start)
    train(apply_overrides(load_config("configs/sft_tiny.py"), [f"init_from={pretrain}"]), sft)

    step("4/6 held-out questions (modules never seen in fine-tuning)", start)
    scores = {}
    for name, run in (("pretrained", pretrain), ("chat-tuned", sft)):
        scores[name], examples = evaluate_workdir(str(run))
    for question, reply, reference in examples[:4]:
        print(f"  Q: {question}\n  A: {reply}\n     (reference: {reference})")
    for name, s in scores.items():
        print(f"  {name:>10}: ROUGE-L {s['rouge_l']:.3f}, exact match {s['exact_match']:.3f} "
              f"on {s['questions']} questions")

    step("5/6 the report card (evaluations, bias, red-team; about a minute)", start)
    report = build_report(sft)
    print(f"  {report} (and {report.with_suffix('.html')}: open it in a browser)")

    if args.no_demo:
        step("done", start)
        return
    step(f"6/6 chat demo on http://127.0.0.1:{args.port} (Ctrl+C to stop)", start)
    from lmjax.serve.demo import launch
    from lmjax.serve.engine import ChatEngine

    launch(ChatEngine.from_workdir(sft), port=args.port)


if __name__ == "__main__":
    main()
