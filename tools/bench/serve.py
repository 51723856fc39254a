"""Serving benchmark: `lmjax serve` against a transformers `generate` server and llama.cpp, on the same weights.

    .venv/bin/python tools/bench/serve.py                      # all three servers, 1/4/16/64 clients
    .venv/bin/python tools/bench/serve.py --quick              # smoke run: 1 and 4 clients, 4 requests each
    .venv/bin/python tools/bench/serve.py --servers lmjax,hf --levels 1 16

What it builds (once, cached under --work, default /tmp/lmjax-serve-bench; details in serve_artefacts.py): a
tokenizer, a seeded random transformers Llama checkpoint of configs/tiny.py's shape that greedy-decodes exactly
`max_tokens` text tokens per request, the lmjax run directory imported from it (logits checked against
transformers') and, when the llama.cpp venv (--llamacpp-python) exists, an f32 GGUF of it.

What it runs: each server in turn as a subprocess on a free localhost port (logs in --work/logs/; lmjax
serve with --slots 64 and, like its peers, without a content filter unless --lmjax-content-filter),
warmed up with one short request per prompt length, then for each concurrency level a closed loop of that
many clients (aiohttp) sending streamed (`stream: true`) greedy `/v1/completions` requests back to back.
The request mix is seeded and the same for every server: prompts of 16/32/64/128 tokens cut from the
standard library's docstrings, `max_tokens` of 32/64/96/120. lmjax and the transformers server get the
prompt as token ids; llama-cpp-python's server takes text only, so it gets the decoded prompt.

What it prints, per server and level: requests, errors, output tokens, wall time, output tokens/s (all
output tokens / wall time of the level), TTFT p50/p99 (request sent -> first chunk with text), ITL p50/p99
(gaps between successive chunks with text), TPOT p50 ((latency - TTFT) / (tokens - 1) per request) and the
client's own CPU use (it shares the machine with the server). Then the ratios: lmjax at 16 clients vs lmjax
at 1, vs transformers at 16 and vs llama.cpp at 16 (or at the highest level run when 16 is not), and the
HTTP + scheduling overhead at batch 1: lmjax's ITL p50 at 1 client against the bare `Engine.step()` time
with one active request in an engine of the server's slot count, timed in this process before the lmjax
servers start and after they stop (the mean of the two; the host is noisy); and the same for an extra
`lmjax serve --slots 1` run at 1 client against a 1-slot engine (there the step is small, so the HTTP and
scheduling cost shows). Everything is also written to --work/results.json.
"""

import argparse
import asyncio
import dataclasses
import glob
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_artefacts import (  # noqa: E402
    DEFAULT_CONVERTER_GLOB,
    DEFAULT_LLAMACPP_PYTHON,
    VENV_BIN,
    Artefacts,
    ModelSpec,
    build_artefacts,
)
from serve_load import (  # noqa: E402
    LevelStats,
    Prompt,
    ServerSpec,
    corpus_ids,
    make_prompts,
    run_level,
    running,
    warm_up,
)

FULL_LEVELS = (1, 4, 16, 64)
QUICK_LEVELS = (1, 4)
RATIO_LEVEL = 16
SERVERS = ("lmjax", "hf", "llamacpp")
LABELS = {"lmjax": "lmjax serve", "lmjax_1slot": "lmjax serve --slots 1 (batch-1 overhead run)",
          "hf": "transformers generate", "llamacpp": "llama.cpp (llama-cpp-python)"}


# --- one server at every level --------------------------------------------------------------------------------


def requests_for(clients: int, args: argparse.Namespace) -> int:
    """How many requests a level of `clients` clients sends."""
    return max(args.min_requests, clients * args.requests_per_client)


def bench_server(spec: ServerSpec, args: argparse.Namespace,
                 prompts_by_level: dict[int, list[Prompt]]) -> list[LevelStats]:
    """Starts the server, warms it up, runs every level, prints its table and stops it."""
    rows = []
    levels = {c: ps for c, ps in prompts_by_level.items() if spec.levels is None or c in spec.levels}
    with running(spec, args.work / "logs", args.ready_timeout) as target:
        asyncio.run(warm_up(target, [p for ps in levels.values() for p in ps]))
        for clients, prompts in levels.items():
            stats = asyncio.run(run_level(target, prompts, clients))
            rows.append(stats)
            print(f"[{spec.name}] {clients:>2} clients: {stats.tokens_per_s:7.1f} tok/s, "
                  f"TTFT p50 {stats.ttft_p50_ms:.0f} ms, ITL p50 {stats.itl_p50_ms:.1f} ms "
                  f"(load average after: {os.getloadavg()[0]:.2f})"
                  + (f", {stats.errors} errors (first: {stats.first_error})" if stats.errors else ""), flush=True)
    print_table(LABELS[spec.name], rows)
    return rows


# --- the bare engine step -------------------------------------------------------------------------------------


def bare_step_ms(run_dir: Path, slots: int, prompt: Sequence[int], steps: int = 60) -> float:
    """Median wall time of `Engine.step()` with one active request decoding in an engine of `slots` slots:
    the jitted decode over all slots plus the engine's own host work, no HTTP."""
    from lmjax.infer.engine import Engine
    from lmjax.run.restore import restore_model
    from lmjax.run.workdir import open_workdir

    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(run_dir))
    engine = Engine(cfg.model, graphdef, params, num_slots=slots, end_ids=[tokenizer.eos_id])
    engine.generate_all([{"prompt_ids": list(prompt), "max_tokens": 8}])  # compiles prefill and decode
    engine.submit(list(prompt), max_tokens=steps + 2)
    engine.step()  # prefill and the first decode
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# --- output ---------------------------------------------------------------------------------------------------


def print_table(title: str, rows: Sequence[LevelStats]) -> None:
    print(f"\n{title}")
    print(f"{'clients':>7} {'reqs':>5} {'errs':>4} {'out tok':>8} {'wall s':>7} {'out tok/s':>9} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'TPOT p50':>9} {'client CPU':>10}")
    for r in rows:
        print(f"{r.clients:>7} {r.requests:>5} {r.errors:>4} {r.tokens:>8} {r.wall_s:>7.1f} {r.tokens_per_s:>9.1f} "
              f"{r.ttft_p50_ms:>7.0f}ms {r.ttft_p99_ms:>7.0f}ms {r.itl_p50_ms:>6.1f}ms {r.itl_p99_ms:>6.1f}ms "
              f"{r.tpot_p50_ms:>7.1f}ms {r.client_cpu:>9.0%}")
    print(flush=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def print_summary(results: dict[str, list[LevelStats]], ratio_level: int, bare_runs: dict[int, list[float]],
                  slots: int) -> dict[str, Any]:
    """Prints the ratios and the batch-1 overheads (`bare_runs`: the bare step times measured, by slot count);
    returns them."""
    def at(server: str, clients: int) -> LevelStats | None:
        return next((r for r in results.get(server, []) if r.clients == clients), None)

    summary: dict[str, Any] = {}
    print("Ratios (output tokens/s; TTFT p50 and ITL p50 as lmjax / other, lower is better for lmjax)")
    ours, ours_1 = at("lmjax", ratio_level), at("lmjax", 1)
    if ours and ours_1 and ratio_level != 1:
        summary[f"lmjax@{ratio_level}/lmjax@1 tok/s"] = ours.tokens_per_s / ours_1.tokens_per_s
        print(f"  lmjax {ratio_level} clients vs lmjax 1 client: tok/s "
              f"{_ratio(ours.tokens_per_s, ours_1.tokens_per_s)}")
    for peer in ("hf", "llamacpp"):
        theirs = at(peer, ratio_level)
        if ours is None or theirs is None:
            print(f"  lmjax vs {LABELS[peer]} at {ratio_level} clients: n/a (not both run)")
            continue
        summary[f"lmjax/{peer}@{ratio_level} tok/s"] = ours.tokens_per_s / theirs.tokens_per_s
        print(f"  lmjax vs {LABELS[peer]} at {ratio_level} clients: tok/s "
              f"{_ratio(ours.tokens_per_s, theirs.tokens_per_s)}, "
              f"TTFT p50 {_ratio(ours.ttft_p50_ms, theirs.ttft_p50_ms)}, "
              f"ITL p50 {_ratio(ours.itl_p50_ms, theirs.itl_p50_ms)}")
    measured = [(server, n) for server, n in (("lmjax", slots), ("lmjax_1slot", 1))
                if at(server, 1) is not None and bare_runs.get(n)]
    if measured:
        print("HTTP + scheduling overhead at batch 1: (ITL p50 at 1 client - bare Engine.step()) / bare step")
    for server, server_slots in measured:
        row = at(server, 1)
        bare = statistics.mean(bare_runs[server_slots])
        overhead = (row.itl_p50_ms - bare) / bare
        summary[f"overhead_{server_slots}_slots"] = {"itl_p50_ms": row.itl_p50_ms, "bare_step_ms": bare,
                                                     "bare_step_runs_ms": bare_runs[server_slots],
                                                     "overhead": overhead}
        runs = " / ".join(f"{t:.2f}" for t in bare_runs[server_slots])
        print(f"  {server_slots:>2} slots: ITL p50 {row.itl_p50_ms:6.2f} ms, bare step {bare:6.2f} ms "
              f"(mean of {runs}): overhead {overhead:+.0%} ({row.itl_p50_ms - bare:+.2f} ms per token)")
    return summary


# --- main -----------------------------------------------------------------------------------------------------


def server_specs(names: Sequence[str], artefacts: Artefacts, args: argparse.Namespace) -> list[ServerSpec]:
    """The servers to run, in `names` order; llama.cpp is skipped with a message when it is not available."""
    specs = []
    for name in names:
        if name == "lmjax":
            specs.append(lmjax_spec("lmjax", artefacts, args.slots, args.lmjax_content_filter))
            if 1 in args.levels and not args.no_overhead_run:
                specs.append(lmjax_spec("lmjax_1slot", artefacts, 1, args.lmjax_content_filter, levels=(1,)))
        elif name == "hf":
            specs.append(ServerSpec("hf", [sys.executable, str(Path(__file__).with_name("hf_server.py")), "--model",
                                           str(artefacts.hf_dir), "--port", "{port}", "--threads", str(args.threads)],
                                    "/health", prompt_as_text=False, stream_usage=True))
        elif artefacts.gguf is None:
            print(f"[llamacpp] skipped: no llama.cpp venv at {args.llamacpp_python} or no converter "
                  f"matching {args.llamacpp_converter} (see the --llamacpp-* flags)", flush=True)
        else:
            specs.append(ServerSpec("llamacpp", [str(args.llamacpp_python), "-m", "llama_cpp.server", "--model",
                                                 str(artefacts.gguf), "--host", "127.0.0.1", "--port", "{port}",
                                                 "--n_ctx", str(2 * artefacts_context(artefacts)),
                                                 "--n_threads", str(args.threads),
                                                 "--n_threads_batch", str(args.threads),
                                                 "--interrupt_requests", "False"],
                                    "/v1/models", prompt_as_text=True, stream_usage=False))
    return specs


def lmjax_spec(name: str, artefacts: Artefacts, slots: int, content_filter: bool,
               levels: tuple[int, ...] | None = None) -> ServerSpec:
    """`lmjax serve` on the run directory with `slots` KV-cache rows."""
    command = [str(VENV_BIN / "lmjax"), "serve", "--workdir", str(artefacts.run_dir), "--port", "{port}",
               "--slots", str(slots)]
    if not content_filter:
        command.append("--no-content-filter")
    return ServerSpec(name, command, "/health", prompt_as_text=False, stream_usage=True, levels=levels)


def artefacts_context(artefacts: Artefacts) -> int:
    """The model's context length (its max_position_embeddings)."""
    return json.loads((artefacts.hf_dir / "config.json").read_text())["max_position_embeddings"]


def find_converter(pattern: str) -> Path | None:
    """The last path matching the glob `pattern` (~ expanded), or None."""
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    return Path(matches[-1]) if matches else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--levels", type=int, nargs="+", help=f"concurrent clients (default {FULL_LEVELS})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: levels {QUICK_LEVELS}, 4 requests each")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per level = max(this x clients, "
                                                                       "--min-requests)")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--slots", type=int, default=64, help="lmjax serve --slots")
    p.add_argument("--lmjax-content-filter", action="store_true",
                   help="keep lmjax serve's blocklist filter on (off by default: the peers have none)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of torch and llama.cpp")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the request mix")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmjax-serve-bench"), help="cache of built artefacts")
    p.add_argument("--llamacpp-python", type=Path, default=DEFAULT_LLAMACPP_PYTHON,
                   help="python of the venv with llama-cpp-python[server] and the converter's deps")
    p.add_argument("--llamacpp-converter", default=DEFAULT_CONVERTER_GLOB,
                   help="convert_hf_to_gguf.py of llama.cpp (a glob; the last match is used)")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for a server to load")
    p.add_argument("--no-bare-step", action="store_true", help="skip timing the bare Engine.step()")
    p.add_argument("--no-overhead-run", action="store_true",
                   help="skip the extra `lmjax serve --slots 1` run at 1 client")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown:
        p.error(f"unknown server(s) {unknown}; choose from {SERVERS}")
    if args.quick:
        args.levels = args.levels or list(QUICK_LEVELS)
        args.requests_per_client, args.min_requests = 1, 4
    args.levels = sorted(set(args.levels or FULL_LEVELS))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    spec = ModelSpec.from_tiny(args.seed)
    llamacpp_python, converter = args.llamacpp_python, find_converter(args.llamacpp_converter)
    want_llamacpp = "llamacpp" in args.servers and llamacpp_python.is_file() and converter is not None
    artefacts = build_artefacts(args.work, spec, llamacpp_python if want_llamacpp else None,
                                converter if want_llamacpp else None)
    corpus = corpus_ids(artefacts.tokenizer_dir)
    prompts_by_level = {c: make_prompts(corpus, artefacts.tokenizer_dir, requests_for(c, args), args.seed + c)
                        for c in args.levels}
    print(f"model: {spec}\nlevels: {args.levels} clients; requests per level: "
          f"{[len(p) for p in prompts_by_level.values()]}; load average {os.getloadavg()[0]:.2f} "
          f"(the servers and this client share the machine: quote runs made when it is otherwise idle)", flush=True)

    specs = server_specs(args.servers, artefacts, args)
    measure_bare = "lmjax" in args.servers and 1 in args.levels and not args.no_bare_step
    bare_runs: dict[int, list[float]] = {slots: [] for slots in sorted({args.slots, 1}, reverse=True)}

    def time_bare_steps(when: str) -> None:
        for slots, times in bare_runs.items():
            times.append(bare_step_ms(artefacts.run_dir, slots, prompts_by_level[1][0].ids))
            print(f"bare Engine.step() with 1 active request in {slots} slots, {when} the lmjax servers: "
                  f"{times[-1]:.2f} ms (median)", flush=True)

    results: dict[str, list[LevelStats]] = {}

    def run_servers(group: Sequence[ServerSpec]) -> None:
        for server in group:
            try:
                results[server.name] = bench_server(server, args, prompts_by_level)
            except RuntimeError as e:
                print(f"[{server.name}] FAILED: {e}", flush=True)

    if measure_bare:
        time_bare_steps("before")
    run_servers([spec for spec in specs if spec.name.startswith("lmjax")])
    if measure_bare:
        time_bare_steps("after")
    run_servers([spec for spec in specs if not spec.name.startswith("lmjax")])
    print(f"\n=== summary (load average now {os.getloadavg()[0]:.2f}) ===")
    for name, rows in results.items():
        print_table(LABELS[name], rows)
    ratio_level = RATIO_LEVEL if RATIO_LEVEL in args.levels else max(args.levels)
    summary = print_summary(results, ratio_level, bare_runs, args.slots)
    out = args.work / "results.json"
    out.write_text(json.dumps({"model": dataclasses.asdict(spec), "levels": args.levels, "summary": summary,
                               "results": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()}},
                              indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
