"""The subcommands that prepare data, train, sample, serve and convert runs: each turns parsed arguments into
one call of the package that does the work and prints what it made."""

import argparse
import sys

from lmjax.config import ConfigError, apply_overrides, load_config


def cmd_train(args: argparse.Namespace) -> None:
    import jax

    from lmjax.run.workdir import Workdir
    from lmjax.train.loop import train

    wd = Workdir(args.workdir)
    if args.config:
        cfg = apply_overrides(load_config(args.config), args.overrides)
    elif wd.has_config():
        cfg = apply_overrides(wd.load_config(), args.overrides)
    else:
        raise ConfigError(f"--config is required: {wd.path} holds no config.json to resume from")
    result = train(cfg, wd.path)
    if jax.process_index() == 0:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def cmd_sample(args: argparse.Namespace) -> None:
    from lmjax.infer.sampler import Sampler
    from lmjax.run.restore import restore_model
    from lmjax.run.workdir import open_workdir

    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(args.workdir), args.step)
    sampler = Sampler(cfg.model, graphdef, params, tokenizer)
    prompts = [args.prompt] * args.num_samples
    texts = sampler.generate(prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             args.stop, args.seed)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)


def cmd_chat(args: argparse.Namespace) -> None:
    from lmjax.serve.engine import ChatEngine
    from lmjax.serve.safety import ContentFilter
    from lmjax.text.blocklist import Blocklist

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


def cmd_demo(args: argparse.Namespace) -> None:
    from lmjax.serve.demo import launch
    from lmjax.serve.engine import ChatEngine

    engine = ChatEngine.from_workdir(args.workdir, args.step, num_slots=args.slots)
    engine.warmup()
    launch(engine, host=args.host, port=args.port)


def cmd_serve(args: argparse.Namespace) -> None:
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


def cmd_compress(args: argparse.Namespace) -> None:
    from lmjax.compress.run import Compression, compress_run

    compression = Compression(args.quant or "", args.group_size, args.prune or "", args.sparsity, args.pattern or "",
                              args.calibration or "", args.calibration_batches, args.kv_cache_dtype or "")
    summary = compress_run(args.workdir, args.out, compression, args.step)
    print(f"wrote {summary['out']} (step {summary['step']}): parameters {summary['source_bytes'] / 1e6:.1f} MB -> "
          f"{summary['bytes'] / 1e6:.1f} MB, block weights {summary['sparsity']:.1%} zero, "
          f"{summary['seconds']:.1f}s")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from lmjax.interop.hf_export import export_hf

    if args.max_shard_gb <= 0:
        raise ConfigError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    print(f"wrote {export_hf(args.workdir, args.out, args.step, int(args.max_shard_gb * 2**30), args.lora)}")


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from lmjax.run.lora import merge_run

    step = merge_run(args.workdir, args.out, args.step)
    print(f"wrote {args.out} (step {step}): the base with the adapters folded in, an ordinary run")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from lmjax.interop.hf import import_hf

    print(f"wrote {import_hf(args.source, args.workdir, args.dtype)}")


def cmd_plan(args: argparse.Namespace) -> None:
    import jax

    from lmjax.train.plan import format_plan, plan

    cfg = apply_overrides(load_config(args.config), args.overrides)
    print(format_plan(plan(cfg, args.devices or jax.device_count(), args.device_memory_gb)))


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmjax.corpus.prepare import prepare, prepare_config

    cfg = apply_overrides(load_config(args.config) if args.config else prepare_config(), args.overrides)
    card = prepare(cfg, args.out)
    print(f"prepared {card['documents_out']} documents ({card['tokens_out']} tokens) into {args.out}; "
          f"card: {args.out}/card.md")
    if cfg.tokens.seq_len:
        from lmjax.input.specs import tokenize_prepared

        tokenize_prepared(args.out, cfg.tokens.seq_len, cfg.tokens.workers)


def cmd_data_tokenize(args: argparse.Namespace) -> None:
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


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmjax.corpus.sources import read_documents
    from lmjax.text.tokenizer import describe_size, train_tokenizer

    tokenizer = train_tokenizer(read_documents(args.source), args.vocab_size, args.out, kind=args.kind)
    print(f"trained a {args.kind} tokenizer ({describe_size(tokenizer, args.kind, args.vocab_size)}) into "
          f"{args.out}/tokenizer.model")


def cmd_tokenizer_stats(args: argparse.Namespace) -> None:
    from lmjax.corpus.sources import read_documents
    from lmjax.text.tokenizer import Tokenizer, tokenizer_stats

    stats = tokenizer_stats(Tokenizer.load(args.tokenizer), read_documents(args.source))
    print(f"{stats['documents']:,} documents, {stats['bytes']:,} bytes, {stats['tokens']:,} tokens: "
          f"{stats['bytes_per_token']:.3f} bytes/token, byte-fallback share {100 * stats['byte_fallback_share']:.3f}%")


def cmd_chat_data(args: argparse.Namespace) -> None:
    from lmjax.corpus.stdlib_chat import write_chat_dataset

    write_chat_dataset(args.out, args.package or None)
