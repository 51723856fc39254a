"""The `lmjax` command: parses arguments and calls one function per subcommand.

    lmjax train  --config configs/tiny.py [--config.model.num_layers=2 ...] --workdir runs/x
    lmjax sample --workdir runs/x --prompt "Return the" [--max-new-tokens 100 --temperature 0.8 ...]
    lmjax chat   --workdir runs/x [--temperature 0.7 --top-p 0.9 --max-new-tokens 128 --system TEXT]
    lmjax demo   --workdir runs/x [--host 127.0.0.1 --port 7860 --step N --slots 8]
    lmjax serve  --workdir runs/x [--host 127.0.0.1 --port 8000 --api-keys keys.toml --slots 16 ...]
    lmjax compress --workdir runs/x --out runs/x-int8 [--quant int8|int4 --group-size 128 --prune wanda --sparsity 0.5]
    lmjax export hf --workdir runs/x --out hf/x [--lora merged|adapter]  (a directory transformers loads)
    lmjax import hf hf/x --workdir runs/y          (a Hugging Face directory as a run; see lmjax/interop/hf.py)
    lmjax eval lm --workdir runs/x --source stdlib:val [--stride S --max-docs N --batch B --json out.json]
    lmjax eval chat --workdir runs/x [--source stdlib:heldout --limit 128]
    lmjax eval robust --workdir runs/x [--eps 0.05,0.1,0.2 --strengths 0.1,0.2,0.4 --attack-steps 5 --json out.json]
    lmjax lora merge --workdir runs/lora --out runs/merged   (a LoRA run's adapters folded into a plain run)
    lmjax plan   --config configs/llama_7b.py [--devices 256] [--device-memory-gb 80] [--config.mesh.fsdp=-1]
    lmjax data prepare --config configs/data/stdlib.py --out data/stdlib
    lmjax feedback export --workdir runs/x --out prefs.jsonl   (preference pairs for train.objective=dpo)
    lmjax feedback purge --workdir runs/x (--older-than-days 30 | --conversation ID)
    lmjax tokenizer train --source stdlib --vocab-size 4096 --out tok/ ; lmjax tokenizer stats --tokenizer tok/

Config overrides are `--config.KEY=VALUE` (or `--config.KEY VALUE`). Errors in the user's input (configs,
data, workdirs, checkpoints: any `LmjaxError`) are printed as one line and exit with status 2; any other
exception is a bug and keeps its traceback. LMJAX_DEBUG=1 shows the traceback of every error.
"""

import argparse
import os
import sys
from collections.abc import Sequence

from lmjax.config import ConfigError, LmjaxError, apply_overrides, load_config


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {arg} has no value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _config(args: argparse.Namespace, overrides: list[str]):
    return apply_overrides(load_config(args.config), overrides)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax

    from lmjax.run.workdir import Workdir
    from lmjax.train.loop import train

    wd = Workdir(args.workdir)
    if args.config:
        cfg = _config(args, overrides)
    elif wd.has_config():
        cfg = apply_overrides(wd.load_config(), overrides)
    else:
        raise ConfigError(f"--config is required: {wd.path} holds no config.json to resume from")
    result = train(cfg, wd.path)
    if jax.process_index() == 0:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def cmd_sample(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.infer.sampler import Sampler
    from lmjax.run.restore import restore_model
    from lmjax.run.workdir import open_workdir

    if overrides:
        raise ConfigError("sample takes no --config overrides (the run's config is used)")
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(args.workdir), args.step)
    sampler = Sampler(cfg.model, graphdef, params, tokenizer)
    prompts = [args.prompt] * args.num_samples
    texts = sampler.generate(prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             args.stop, args.seed)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.serve.engine import ChatEngine
    from lmjax.serve.safety import ContentFilter
    from lmjax.text.blocklist import Blocklist

    if overrides:
        raise ConfigError("chat takes no --config overrides (the run's config is used)")
    engine = ChatEngine.from_workdir(args.workdir, args.step)
    content_filter = ContentFilter(Blocklist.default())
    system, messages = args.system, []
    interactive = sys.stdin.isatty()
    print("lmjax chat: /system TEXT sets the system prompt, /reset starts over, /quit leaves", flush=True)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            messages = []
            print("(conversation reset)", flush=True)
        elif line.startswith("/system"):
            system = line[len("/system"):].strip()
            print(f"(system prompt: {system!r})", flush=True)
        elif line:
            messages.append({"role": "user", "content": line})
            if content_filter.screen_input(line):
                reply = content_filter.refusal
                print(f"assistant> {reply}", flush=True)
            else:
                conversation = ([{"role": "system", "content": system}] if system else []) + messages
                stream = engine.stream_reply(conversation, args.temperature, args.top_p, args.max_new_tokens,
                                             args.seed + len(messages))
                print("assistant> ", end="", flush=True)
                reply = ""
                for text in content_filter.screen_stream(stream):
                    shown = text[len(reply):] if text.startswith(reply) else "\n" + text
                    print(shown, end="", flush=True)
                    reply = text
                print(flush=True)
            messages.append({"role": "assistant", "content": reply})


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.serve.demo import launch
    from lmjax.serve.engine import ChatEngine

    if overrides:
        raise ConfigError("demo takes no --config overrides (the run's config is used)")
    engine = ChatEngine.from_workdir(args.workdir, args.step, num_slots=args.slots)
    engine.warmup()
    launch(engine, host=args.host, port=args.port)


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    import ipaddress
    import logging
    from pathlib import Path

    import uvicorn

    from lmjax.serve.api import ServeSettings, create_app
    from lmjax.serve.auth import read_keys
    from lmjax.serve.engine import ChatEngine
    from lmjax.serve.feedback import FeedbackStore
    from lmjax.serve.safety import ContentFilter
    from lmjax.text.blocklist import Blocklist

    if overrides:
        raise ConfigError("serve takes no --config overrides (the run's config is used)")
    keys = read_keys(args.api_keys) if args.api_keys else None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if keys is None and not loopback and not args.allow_unauthenticated:
        raise ConfigError(f"refusing to listen on {args.host} without API keys: pass --api-keys FILE, or "
                          "--allow-unauthenticated if the network in front of it is trusted")
    access = logging.getLogger("lmjax.access")
    access.setLevel(logging.INFO)
    access.propagate = False
    handler = logging.FileHandler(args.access_log) if args.access_log else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    engine = ChatEngine.from_workdir(args.workdir, args.step, num_slots=args.slots)
    feedback = FeedbackStore.for_workdir(engine.workdir.path, scrub=not args.no_pii_scrub)
    settings = ServeSettings(
        model_name=args.model_name or Path(args.workdir).resolve().name, keys=keys,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue, request_timeout=args.request_timeout, log_prompts=args.log_prompts,
        store_chats=not args.no_store_chats)
    content_filter = None if args.no_content_filter else ContentFilter(Blocklist.default(), feedback)
    app = create_app(engine, settings, feedback, content_filter)
    quant = engine.cfg.compress.quant
    print(f"lmjax serve: {settings.model_name} (step {engine.step}, {engine.context}-token context, "
          f"{engine.cfg.model.dtype}{f', {quant} weights' if quant else ''}, {args.slots} slots) on "
          f"http://{args.host}:{args.port}/v1; compiling, /health "
          "turns 200 when ready", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)


def cmd_compress(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.compress.run import Compression, compress_run

    if overrides:
        raise ConfigError("compress takes no --config overrides")
    compression = Compression(args.quant or "", args.group_size, args.prune or "", args.sparsity, args.pattern or "",
                              args.calibration or "", args.calibration_batches, args.kv_cache_dtype or "")
    summary = compress_run(args.workdir, args.out, compression, args.step)
    print(f"wrote {summary['out']} (step {summary['step']}): parameters {summary['source_bytes'] / 1e6:.1f} MB -> "
          f"{summary['bytes'] / 1e6:.1f} MB, block weights {summary['sparsity']:.1%} zero, "
          f"{summary['seconds']:.1f}s")


def cmd_export_hf(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.interop.hf_export import export_hf

    if overrides:
        raise ConfigError("export takes no --config overrides")
    if args.max_shard_gb <= 0:
        raise ConfigError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    print(f"wrote {export_hf(args.workdir, args.out, args.step, int(args.max_shard_gb * 2**30), args.lora)}")



def cmd_lora_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.run.lora import merge_run

    if overrides:
        raise ConfigError("lora merge takes no --config overrides")
    step = merge_run(args.workdir, args.out, args.step)
    print(f"wrote {args.out} (step {step}): the base with the adapters folded in, an ordinary run")


def cmd_import_hf(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.interop.hf import import_hf

    if overrides:
        raise ConfigError("import takes no --config overrides")
    print(f"wrote {import_hf(args.source, args.workdir, args.dtype)}")


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax

    from lmjax.train.plan import format_plan, plan

    cfg = _config(args, overrides)
    print(format_plan(plan(cfg, args.devices or jax.device_count(), args.device_memory_gb)))


def cmd_data_prepare(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.corpus.prepare import prepare, prepare_config

    cfg = apply_overrides(load_config(args.config) if args.config else prepare_config(), overrides)
    card = prepare(cfg, args.out)
    print(f"prepared {card['documents_out']} documents ({card['tokens_out']} tokens) into {args.out}; "
          f"card: {args.out}/card.md")
    if cfg.tokens.seq_len:
        from lmjax.input.specs import tokenize_prepared

        tokenize_prepared(args.out, cfg.tokens.seq_len, cfg.tokens.workers)


def cmd_data_tokenize(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.input.specs import tokenize_prepared, tokenize_sources
    from lmjax.text.tokenizer import load_tokenizer

    if args.prepared:
        if args.source or args.out:
            raise ConfigError("--prepared writes DIR/tokens with DIR's tokenizer: give no --source or --out")
        tokenize_prepared(args.prepared, args.seq_len, args.workers)
        return
    if not (args.source and args.tokenizer and args.out):
        raise ConfigError("give --prepared DIR, or --source SPEC, --tokenizer DIR and --out DIR")
    tokenize_sources(args.source, args.val, load_tokenizer(args.tokenizer), args.seq_len, args.out, args.workers)


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.corpus.sources import read_documents
    from lmjax.text.tokenizer import describe_size, train_tokenizer

    tokenizer = train_tokenizer(read_documents(args.source), args.vocab_size, args.out, kind=args.kind)
    print(f"trained a {args.kind} tokenizer ({describe_size(tokenizer, args.kind, args.vocab_size)}) into "
          f"{args.out}/tokenizer.model")


def cmd_tokenizer_stats(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.corpus.sources import read_documents
    from lmjax.text.tokenizer import Tokenizer, tokenizer_stats

    stats = tokenizer_stats(Tokenizer.load(args.tokenizer), read_documents(args.source))
    print(f"{stats['documents']:,} documents, {stats['bytes']:,} bytes, {stats['tokens']:,} tokens: "
          f"{stats['bytes_per_token']:.3f} bytes/token, byte-fallback share {100 * stats['byte_fallback_share']:.3f}%")


def cmd_chat_data(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.corpus.stdlib_chat import write_chat_dataset

    write_chat_dataset(args.out, args.package or None)


def _write_json(path: str | None, results: dict) -> None:
    """Writes `results` to `path` (a command's --json), if given."""
    if path:
        import json

        from lmjax.text.io import atomic_write

        atomic_write(path, json.dumps(results, indent=2) + "\n")


def cmd_eval_tasks(args: argparse.Namespace, overrides: list[str]) -> None:
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


def cmd_eval_bias(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.eval.bias import evaluate_bias

    results = evaluate_bias(args.workdir, args.step)
    print(f"{'probe':<26} {'stereotype share':>16} {'95% interval':>15} {'p (no pref.)':>12} {'pairs':>6}")
    for name, r in results.items():
        print(f"{name:<26} {r['stereotype_share']:16.3f}   [{r['low']:.2f}, {r['high']:.2f}] {r['p_value']:12.3g} "
              f"{r['pairs']:6d}")
    print("0.5 = no preference between the stereotypical and the other side of each pair")
    _write_json(args.json, results)


def cmd_eval_redteam(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.eval.redteam import evaluate_redteam

    results = evaluate_redteam(args.workdir, args.step, output_filter=not args.no_output_filter)
    print(f"{'category':<22} {'prompts':>7} {'blocked in':>10} {'blocked out':>11} {'harmful through':>15}")
    for name, r in results.items():
        print(f"{name:<22} {r['prompts']:7d} {r['blocked_input']:10.0%} {r['blocked_output']:11.0%} "
              f"{r['harmful_through']:15.0%}")
    print(f"benign prompts blocked (false positives): {results['benign']['false_positives']:.0%}")
    _write_json(args.json, results)


def cmd_eval_safety(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.eval.safety import evaluate_safety, format_safety

    results = evaluate_safety(args.workdir, args.step, args.phrasings)
    print(format_safety(results))
    print("refused: by the model alone; +filter: behind the content filter (blocklist at input and output)")
    _write_json(args.json, results)


def cmd_eval_lm(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.eval.lm import evaluate_source, format_lm

    if overrides:
        raise ConfigError("eval lm takes no --config overrides (the run's config is used)")
    result = evaluate_source(args.workdir, args.source, args.step, args.stride, args.max_docs, args.batch)
    print(format_lm(result))
    _write_json(args.json, result)


def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers ("" is the empty list)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_eval_robust(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.eval.robust import evaluate_robust, format_robust

    if overrides:
        raise ConfigError("eval robust takes no --config overrides (the run's config is used)")
    result = evaluate_robust(args.workdir, args.step, _floats(args.eps), _floats(args.strengths), args.attack_steps,
                             args.norm, args.batches, args.batch_size, args.questions, args.chat, not args.no_redteam,
                             args.source, args.chat_source, args.seed)
    print(format_robust(result))
    _write_json(args.json, result)


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.report.card import build_report

    path = build_report(args.workdir, args.out)
    print(f"wrote {path} and {path.with_suffix('.html')}")


def cmd_eval_chat(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmjax.eval.chat_qa import evaluate_workdir
    from lmjax.eval.metrics import format_metrics

    result, examples = evaluate_workdir(args.workdir, args.source, args.limit, args.step)
    for question, reply, reference in examples[: args.show]:
        print(f"Q: {question}\nA: {reply}\nreference: {reference}\n")
    print(f"{args.workdir}: greedy replies to {result['questions']} questions of chat:{args.source}")
    print(format_metrics(result["metrics"]))


def cmd_feedback_export(args: argparse.Namespace, overrides: list[str]) -> None:
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


def cmd_feedback_purge(args: argparse.Namespace, overrides: list[str]) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmjax", description="Train and sample small language models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumes if the workdir has checkpoints)")
    p.add_argument("--config", help="config file (default: the workdir's config.json when resuming)")
    p.add_argument("--workdir", required=True, help="run directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="completions drawn as one batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("chat", help="chat with a trained run in the terminal (reads stdin)")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=128, help="reply tokens at most")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="serve the chat demo page (Gradio) of a trained run")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--slots", type=int, default=8, help="conversations generated at once")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve a trained run over an OpenAI-compatible HTTP API")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-keys", help="TOML file of API keys and their limits (see lmjax/serve/auth.py)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow a non-loopback --host without --api-keys")
    p.add_argument("--model-name", help="model id clients use (default: the run directory's name)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: context - 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens (default: the context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--access-log", help="file for the JSON access log (default: stderr)")
    p.add_argument("--log-prompts", action="store_true", help="put prompt text in the access log")
    p.add_argument("--no-content-filter", action="store_true", help="turn the blocklist filter off")
    p.add_argument("--no-pii-scrub", action="store_true", help="store conversation text without PII scrubbing")
    p.add_argument("--no-store-chats", action="store_true",
                   help="do not keep chat completions (then /v1/feedback cannot rate them)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compress", help="write a run with quantized and/or pruned weights (serve it like any run)")
    p.add_argument("--workdir", required=True, help="the trained run to compress")
    p.add_argument("--out", required=True, help="new run directory to write (must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--quant", choices=("int8", "int4"), help="int8 per output channel or int4 in groups")
    p.add_argument("--group-size", type=int, default=0, help="int4: inputs per scale (e.g. 128 or 32; 0 = per channel)")
    p.add_argument("--prune", choices=("magnitude", "wanda"), help="zero the least important block weights")
    p.add_argument("--sparsity", type=float, default=0.0, help="share of block weights to zero, e.g. 0.5")
    p.add_argument("--pattern", help="N:M pattern instead of --sparsity, e.g. 2:4")
    p.add_argument("--calibration", help="wanda: data spec of calibration text (default: the run's data.val)")
    p.add_argument("--calibration-batches", type=int, default=8, help="wanda: batches of 8 rows")
    p.add_argument("--kv-cache-dtype", choices=("float32", "bfloat16", "int8"), help="KV cache of the new run "
                   "(int8: a scale per token and head; default: the source's)")
    p.set_defaults(func=cmd_compress)

    export = sub.add_parser("export", help="write a run in another library's format").add_subparsers(
        dest="export_command", required=True)
    p = export.add_parser("hf", help="a Hugging Face directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--workdir", required=True, help="the run to export")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="weights above this go into several shards")
    p.add_argument("--lora", default="merged", choices=("merged", "adapter"),
                   help="a LoRA run: adapters merged into the weights, or the base plus a PEFT adapter in OUT/adapter")
    p.set_defaults(func=cmd_export_hf)

    lora = sub.add_parser("lora", help="LoRA runs (train.lora.*)").add_subparsers(dest="lora_command", required=True)
    p = lora.add_parser("merge", help="write a LoRA run as an ordinary run with the adapters folded into the weights")
    p.add_argument("--workdir", required=True, help="the LoRA run")
    p.add_argument("--out", required=True, help="new run directory to write (must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=cmd_lora_merge)

    imports = sub.add_parser("import", help="read a model saved by another library").add_subparsers(
        dest="import_command", required=True)
    p = imports.add_parser("hf", help="a Hugging Face GPT-2 / Llama / Mistral / Qwen2 model as a new run directory")
    p.add_argument("source", help="directory with config.json, safetensors and tokenizer.json (or a hub model id, "
                   "e.g. Qwen/Qwen2.5-0.5B-Instruct, where the hub is reachable)")
    p.add_argument("--workdir", required=True, help="run directory to write (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter and compute dtype")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("plan", help="parameters, FLOPs and per-device memory of a config, without allocating")
    p.add_argument("--config", required=True, help="config file")
    p.add_argument("--devices", type=int, default=0, help="devices in the mesh (default: those present)")
    p.add_argument("--device-memory-gb", type=float, default=0.0,
                   help="GB (1e9 bytes) per device: say whether the run fits and the largest batch that does")
    p.set_defaults(func=cmd_plan)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="clean, deduplicate, split and shard sources; write a data card")
    p.add_argument("--config", help="data config file (configs/data/*.py); default: all defaults")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("tokenize", help="write token shards (what training reads) of a prepared directory or a "
                        "raw source")
    p.add_argument("--prepared", help="a `data prepare` directory: writes DIR/tokens with its tokenizer")
    p.add_argument("--source", help="raw data spec for the train split (documents or chat:...)")
    p.add_argument("--val", default="", help="raw data spec for the val split (optional)")
    p.add_argument("--tokenizer", help="tokenizer directory (with --source)")
    p.add_argument("--out", help="output directory (with --source)")
    p.add_argument("--seq-len", type=int, required=True, help="model.seq_len of the runs that read them")
    p.add_argument("--workers", type=int, default=2, help="tokenizing processes")
    p.set_defaults(func=cmd_data_tokenize)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a SentencePiece tokenizer on a source")
    p.add_argument("--source", required=True, help="source spec, e.g. stdlib or jsonl:data/*.jsonl")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="vocabulary size (bpe, unigram; char has one token per character seen)")
    p.add_argument("--kind", default="bpe", choices=("bpe", "unigram", "char"), help="SentencePiece model type")
    p.add_argument("--out", required=True, help="directory for tokenizer.model")
    p.set_defaults(func=cmd_tokenizer_train)
    p = sub.add_parser("chat-data", help="write the embedded chat dataset (or one for your packages) as JSONL")
    p.add_argument("--out", required=True, help="directory for train.jsonl and heldout.jsonl")
    p.add_argument("--package", action="append", default=[], help="package to build it from (repeatable)")
    p.set_defaults(func=cmd_chat_data)

    evaluation = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    p = evaluation.add_parser("lm", help="loss, perplexity and bits per byte of documents scored whole "
                              "(sliding window), beside the unigram baseline")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--source", required=True, help="data spec: stdlib:val, a prepared directory[:val], "
                   "jsonl:GLOB, ... or chat:SOURCE (assistant tokens only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride in tokens (default: half the "
                   "context; the context length gives non-overlapping chunks)")
    p.add_argument("--max-docs", type=int, default=None, help="score only the first N documents")
    p.add_argument("--batch", type=int, default=8, help="rows of context length per jitted step")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval_lm)
    p = evaluation.add_parser("chat", help="BLEU, chrF, ROUGE, METEOR and exact match (with bootstrap intervals) "
                              "of greedy replies on held-out questions")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--source", default="stdlib:heldout", help="chat source (stdlib:heldout or a JSONL glob)")
    p.add_argument("--limit", type=int, default=128, help="questions to ask")
    p.add_argument("--show", type=int, default=3, help="examples to print")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=cmd_eval_chat)
    p = evaluation.add_parser("tasks", help="few-shot multiple-choice and generation tasks, centered on chance")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--tasks", default="stdlib_module_mc,stdlib_docstring_mc,stdlib_chat_qa",
                   help="comma-separated task names (built-in: lmjax/eval/tasks/; more with --tasks-dir)")
    p.add_argument("--tasks-dir", default=None, help="a directory of task YAML + JSONL files")
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval_tasks)
    p = evaluation.add_parser("bias", help="stereotype preference on occupation, CrowS-style and BBQ-style probes")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval_bias)
    p = evaluation.add_parser("redteam", help="adversarial prompts through the model and the content filter")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--no-output-filter", action="store_true", help="measure the model alone on its replies")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval_redteam)
    p = evaluation.add_parser("robust", help="held-out loss under random and PGD embedding perturbations, chat "
                              "ROUGE-L under prompt noise, red-team attack success rate")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--eps", default="0.05,0.1,0.2", help="comma-separated radii, relative to the embedding table's "
                   "RMS row norm (\"\" skips the loss part)")
    p.add_argument("--norm", default="l2", choices=("l2", "linf"), help="ball of the embedding perturbations")
    p.add_argument("--attack-steps", type=int, default=5, help="PGD steps")
    p.add_argument("--batches", type=int, default=1, help="held-out batches for the loss part")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the run's validation "
                   "micro-batch)")
    p.add_argument("--source", default=None, help="data spec for the loss part (default: the run's data.val)")
    p.add_argument("--strengths", default="0.1,0.2,0.4", help="comma-separated prompt-noise strengths in [0, 1] "
                   "(the expected fraction of words edited)")
    p.add_argument("--questions", type=int, default=32, help="held-out questions for ROUGE-L (0 skips it)")
    p.add_argument("--chat-source", default=None, help="chat source of the questions (default: the run's "
                   "chat data.val, else stdlib:heldout)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="run the chat and red-team parts (default: only for chat runs)")
    p.add_argument("--no-redteam", action="store_true", help="skip the red-team part")
    p.add_argument("--seed", type=int, default=0, help="seeds the perturbations")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval_robust)
    p = evaluation.add_parser("safety", help="refusals of held-out harmful requests, over-refusals of look-alikes")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--phrasings", type=int, default=None, help="phrasings asked per request (default: all)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval_safety)

    p = sub.add_parser("report", help="evaluate a run and write its report card (Markdown + HTML, plots)")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--out", default=None, help="directory for the report (default: WORKDIR/report)")
    p.set_defaults(func=cmd_report)

    feedback = sub.add_parser("feedback", help="ratings and edits collected by the demo and the API").add_subparsers(
        dest="feedback_command", required=True)
    p = feedback.add_parser("export", help="write (prompt, chosen, rejected) pairs as JSONL for DPO")
    p.add_argument("--workdir", required=True, help="run directory holding the feedback database")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.set_defaults(func=cmd_feedback_export)
    p = feedback.add_parser("purge", help="delete stored conversations by age or by conversation id")
    p.add_argument("--workdir", required=True, help="run directory holding the feedback database")
    p.add_argument("--older-than-days", type=float, default=None, help="delete what is older than this")
    p.add_argument("--conversation", default=None, help="delete this session / completion id")
    p.set_defaults(func=cmd_feedback_purge)

    p = tok.add_parser("stats", help="bytes per token and byte-fallback share on held-out text")
    p.add_argument("--tokenizer", required=True, help="directory (or file) of tokenizer.model")
    p.add_argument("--source", default="stdlib:val", help="held-out source spec")
    p.set_defaults(func=cmd_tokenizer_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status (2 for an `LmjaxError`, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = _split_overrides(argv)
        args = build_parser().parse_args(rest)
        args.func(args, overrides)
    except LmjaxError as e:
        if os.environ.get("LMJAX_DEBUG", "") not in ("", "0"):
            raise
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
