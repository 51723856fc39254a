"""The subcommands that read finished runs: evaluations, the report card and the feedback database."""

import argparse

from lmjax.config import ConfigError


def _write_json(path: str | None, results: dict) -> None:
    """Writes `results` to `path` (a command's --json), if given."""
    if path:
        import json

        from lmjax.text.io import atomic_write

        atomic_write(path, json.dumps(results, indent=2) + "\n")


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from lmjax.eval.tasks import evaluate_tasks

    names = [n for n in args.tasks.split(",") if n]
    results = evaluate_tasks(args.workdir, names, args.tasks_dir, args.limit, args.step)
    print(f"{'task':<24} {'acc':>6} {'acc_norm':>8} {'chance':>6} {'centered':>8} {'n':>5}")
    for name, r in results.items():
        if name != "mean":
            acc = r.get("acc", r.get("exact_match"))
            print(f"{name:<24} {acc:6.3f} {r.get('acc_norm', acc):8.3f} {r['chance']:6.3f} {r['centered']:8.3f} "
                  f"{r['questions']:5d}")
    print(f"{'mean centered':<24} {'':>6} {'':>8} {'':>6} {results['mean']['centered']:8.3f}")
    _write_json(args.json, results)


def cmd_eval_bias(args: argparse.Namespace) -> None:
    from lmjax.eval.bias import evaluate_bias

    results = evaluate_bias(args.workdir, args.step)
    print(f"{'probe':<26} {'stereotype share':>16} {'95% interval':>15} {'p (no pref.)':>12} {'pairs':>6}")
    for name, r in results.items():
        print(f"{name:<26} {r['stereotype_share']:16.3f}   [{r['low']:.2f}, {r['high']:.2f}] {r['p_value']:12.3g} "
              f"{r['pairs']:6d}")
    print("0.5 = no preference between the stereotypical and the other side of each pair")
    _write_json(args.json, results)


def cmd_eval_redteam(args: argparse.Namespace) -> None:
    from lmjax.eval.redteam import evaluate_redteam

    results = evaluate_redteam(args.workdir, args.step, output_filter=not args.no_output_filter)
    print(f"{'category':<22} {'prompts':>7} {'blocked in':>10} {'blocked out':>11} {'harmful through':>15}")
    for name, r in results.items():
        print(f"{name:<22} {r['prompts']:7d} {r['blocked_input']:10.0%} {r['blocked_output']:11.0%} "
              f"{r['harmful_through']:15.0%}")
    print(f"benign prompts blocked (false positives): {results['benign']['false_positives']:.0%}")
    _write_json(args.json, results)


def cmd_eval_safety(args: argparse.Namespace) -> None:
    from lmjax.eval.safety import evaluate_safety, format_safety

    results = evaluate_safety(args.workdir, args.step, args.phrasings)
    print(format_safety(results))
    print("refused: by the model alone; +filter: behind the content filter (blocklist at input and output)")
    _write_json(args.json, results)


def cmd_eval_lm(args: argparse.Namespace) -> None:
    from lmjax.eval.lm import evaluate_source, format_lm

    result = evaluate_source(args.workdir, args.source, args.step, args.stride, args.max_docs, args.batch)
    print(format_lm(result))
    _write_json(args.json, result)


def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers ("" is the empty list)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_eval_robust(args: argparse.Namespace) -> None:
    from lmjax.eval.robust import evaluate_robust, format_robust

    result = evaluate_robust(args.workdir, args.step, _floats(args.eps), _floats(args.strengths), args.attack_steps,
                             args.norm, args.batches, args.batch_size, args.questions, args.chat, not args.no_redteam,
                             args.source, args.chat_source, args.seed)
    print(format_robust(result))
    _write_json(args.json, result)


def cmd_report(args: argparse.Namespace) -> None:
    from lmjax.report.card import build_report

    path = build_report(args.workdir, args.out)
    print(f"wrote {path} and {path.with_suffix('.html')}")


def cmd_eval_chat(args: argparse.Namespace) -> None:
    from lmjax.eval.chat_qa import evaluate_workdir
    from lmjax.eval.metrics import format_metrics

    result, examples = evaluate_workdir(args.workdir, args.source, args.limit, args.step)
    for question, reply, reference in examples[: args.show]:
        print(f"Q: {question}\nA: {reply}\nreference: {reference}\n")
    print(f"{args.workdir}: greedy replies to {result['questions']} questions of chat:{args.source}")
    print(format_metrics(result["metrics"]))


def cmd_feedback_export(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from lmjax.run.workdir import WorkdirError
    from lmjax.serve.feedback import FILENAME, export_preferences

    db = Path(args.workdir) / FILENAME
    if not db.is_file():
        raise WorkdirError(f"{args.workdir} has no feedback database ({FILENAME})")
    pairs = export_preferences(db)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
    print(f"wrote {len(pairs)} preference pairs to {args.out}")


def cmd_feedback_purge(args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    from lmjax.run.workdir import WorkdirError
    from lmjax.serve.feedback import FILENAME, FeedbackStore

    db = Path(args.workdir) / FILENAME
    if not db.is_file():
        raise WorkdirError(f"{args.workdir} has no feedback database ({FILENAME})")
    if (args.older_than_days is None) == (args.conversation is None):
        raise ConfigError("pass exactly one of --older-than-days and --conversation")
    store = FeedbackStore(db)
    if args.conversation is not None:
        count = store.purge(session_id=args.conversation)
        print(f"deleted {count} stored replies of conversation {args.conversation}")
    else:
        count = store.purge(older_than=time.time() - args.older_than_days * 86400)
        print(f"deleted {count} stored replies older than {args.older_than_days:g} days")
