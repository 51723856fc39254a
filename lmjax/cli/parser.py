"""The `lmjax` argument parser: every subcommand, its flags and the function that runs it. Commands that build
a config (`train`, `plan`, `data prepare`) set `takes_overrides`; the others refuse `--config.KEY=VALUE`."""

import argparse

from lmjax.cli.commands import (
    cmd_chat,
    cmd_chat_data,
    cmd_compress,
    cmd_data_prepare,
    cmd_data_tokenize,
    cmd_demo,
    cmd_export_hf,
    cmd_import_hf,
    cmd_lora_merge,
    cmd_plan,
    cmd_sample,
    cmd_serve,
    cmd_tokenizer_stats,
    cmd_tokenizer_train,
    cmd_train,
)
from lmjax.cli.eval_commands import (
    cmd_eval_bias,
    cmd_eval_chat,
    cmd_eval_lm,
    cmd_eval_redteam,
    cmd_eval_robust,
    cmd_eval_safety,
    cmd_eval_tasks,
    cmd_feedback_export,
    cmd_feedback_purge,
    cmd_report,
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `lmjax` and all its subcommands."""
    parser = argparse.ArgumentParser(prog="lmjax", description="Train and sample small language models in JAX.")
    parser.set_defaults(takes_overrides=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumes if the workdir has checkpoints)")
    p.add_argument("--config", help="config file (default: the workdir's config.json when resuming)")
    p.add_argument("--workdir", required=True, help="run directory")
    p.set_defaults(func=cmd_train, takes_overrides=True)

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
    p.set_defaults(func=cmd_plan, takes_overrides=True)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="clean, deduplicate, split and shard sources; write a data card")
    p.add_argument("--config", help="data config file (configs/data/*.py); default: all defaults")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    p.set_defaults(func=cmd_data_prepare, takes_overrides=True)
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
    p = tok.add_parser("stats", help="bytes per token and byte-fallback share on held-out text")
    p.add_argument("--tokenizer", required=True, help="directory (or file) of tokenizer.model")
    p.add_argument("--source", default="stdlib:val", help="held-out source spec")
    p.set_defaults(func=cmd_tokenizer_stats)
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
    return parser
