"""Compression benchmark: what each quantization and pruning costs in quality, and what it buys in size and
decode speed, against float32, the memory-bandwidth bound and llama.cpp in the same run.

Quality (`--pretrain`, `--chat`: the quickstart's runs): every variant is made with `lmjax compress` (or, for
bfloat16, by rounding the weights to bfloat16) from the pretrained run and from the chat-tuned run; the
table gives held-out bits per byte of the pretrained model (its data.val, `--val-batches` batches) and
ROUGE-L of the chat model on the quickstart's held-out questions (`--questions`), both through the path
that serves (on a CPU: the int8 matmul), plus the parameter file size. Wanda calibrates on each run's
training data (`lmjax compress` defaults to data.val, which here is the scored text).

Speed (`--speed`): random Llama weights of `gpt2_small`-like shapes (d768, 12 layers, d_ff 2048, vocab
4096; 91M parameters), built by tools/bench/serve_artefacts.py's helpers (HF checkpoint -> lmjax run; GGUF by
llama.cpp's converter). Decode tokens/s of the engine at batch 1 and 16 (32-token prompt, steady state),
for float32, bfloat16, int8 and int4 g128, against:
- the bandwidth bound: a large array's read bytes/s (a jitted sum) divided by the weight bytes each token
  reads;
- llama.cpp (llama-cpp-python, 2 threads) f32, f16 and q8_0 GGUFs of the same weights, batch 1, 128 greedy
  tokens after a 32-token prompt (when its venv exists; see tools/bench/serve_artefacts.py).

    .venv/bin/python tools/bench/compress.py --pretrain runs/quickstart/pretrain --chat runs/quickstart/sft
    .venv/bin/python tools/bench/compress.py --speed --no-quality
    .venv/bin/python tools/bench/compress.py --pretrain runs/gpt2_small_brief --chat '' --work runs/bench-gpt2
"""

import argparse
import dataclasses
import glob
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import tokens_per_second  # noqa: E402
from serve_artefacts import (  # noqa: E402
    DEFAULT_CONVERTER_GLOB,
    DEFAULT_LLAMACPP_PYTHON,
    ModelSpec,
    make_gguf,
    make_hf_checkpoint,
    make_run_dir,
    make_tokenizer,
)

from lmjax.compress.run import Compression, compress_run  # noqa: E402
from lmjax.eval.chat_qa import evaluate_workdir  # noqa: E402
from lmjax.eval.lm import eval_step, lm_metrics  # noqa: E402
from lmjax.infer.engine import Engine  # noqa: E402
from lmjax.input.packing import eval_batches  # noqa: E402
from lmjax.input.specs import open_chunks  # noqa: E402
from lmjax.model.params import abstract_model  # noqa: E402
from lmjax.run.checkpoint import Checkpointer  # noqa: E402
from lmjax.run.restore import restore_model  # noqa: E402
from lmjax.run.workdir import Workdir, open_workdir  # noqa: E402

VARIANTS = {  # name -> what `lmjax compress` does ("bfloat16" rounds the weights instead)
    "float32": None,
    "bfloat16": None,
    "int8": Compression(quant="int8"),
    "int4 g128": Compression(quant="int4", group_size=128),
    "int4 g32": Compression(quant="int4", group_size=32),
    "50% magnitude": Compression(prune="magnitude", sparsity=0.5),
    "50% wanda": Compression(prune="wanda", sparsity=0.5),
    "2:4 magnitude": Compression(prune="magnitude", pattern="2:4"),
    "2:4 wanda": Compression(prune="wanda", pattern="2:4"),
    "int8 + 50% wanda": Compression(quant="int8", prune="wanda", sparsity=0.5),
}
SPEED_SPEC = ModelSpec(vocab_size=4096, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                       d_ff=2048, seq_len=512, norm_eps=1e-5, rope_theta=10000.0, seed=0)


def params_bytes(run: Path) -> int:
    wd = Workdir(run)
    with Checkpointer(wd.checkpoint_dir) as ckpt:
        step = ckpt.resolve_step(None)
    return sum(p.stat().st_size for p in (wd.checkpoint_dir / str(step) / "params").rglob("*") if p.is_file())


def variant_run(source: Path, name: str, work: Path) -> Path:
    """The run directory of variant `name` of `source` (made once under `work`)."""
    compression = VARIANTS[name]
    if compression is None:
        return source
    out = work / f"{source.name}-{name.replace(' ', '_').replace('%', 'pct').replace(':', 'of')}"
    if not out.is_dir():
        if compression.prune == "wanda":  # calibrate on training text, never on the text that is scored
            compression = dataclasses.replace(compression, calibration=open_workdir(source).load_config().data.train)
        compress_run(source, out, compression)
    return out


def held_out_bpb(run: Path, val_batches: int, bfloat16: bool) -> float:
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(run))
    if bfloat16:
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    chunks = open_chunks(cfg.data.val, tokenizer, cfg.model.seq_len)
    batches = eval_batches(chunks, cfg.model.seq_len, 8, val_batches)
    step = jax.jit(lambda p, b, t: eval_step(p, b, t, graphdef=graphdef))
    return lm_metrics(step, params, batches, jnp.asarray(tokenizer.token_bytes()))["val_bpb"]


def chat_rouge(run: Path, questions: int, bfloat16: bool, work: Path) -> float:
    if bfloat16:  # a float run with bfloat16-rounded weights, written like any run
        out = work / f"{run.name}-bfloat16"
        if not out.is_dir():
            cfg, _, params, tokenizer, step = restore_model(open_workdir(run))
            wd = Workdir(out)
            shutil.copytree(Workdir(run).tokenizer_dir, wd.tokenizer_dir)
            wd.save_config(open_workdir(run).load_config())
            with Checkpointer(wd.checkpoint_dir) as ckpt:
                ckpt.save_params(step, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params))
        run = out
    return evaluate_workdir(str(run), limit=questions)[0]["rouge_l"]


def quality(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    for name in VARIANTS:
        start = time.time()
        pre = variant_run(args.pretrain, name, work)
        bf16 = name == "bfloat16"
        row = {"variant": name, "bytes": params_bytes(pre) // (2 if bf16 else 1),
               "val_bpb": held_out_bpb(pre, args.val_batches, bf16), "rouge_l": float("nan")}
        if args.chat:
            row["rouge_l"] = chat_rouge(variant_run(Path(args.chat), name, work), args.questions, bf16, work)
        rows.append(row)
        print(f"[quality] {name}: bpb {row['val_bpb']:.4f}, ROUGE-L {row['rouge_l']:.3f}, "
              f"{row['bytes'] / 1e6:.2f} MB ({time.time() - start:.0f}s)", flush=True)
    return rows


def read_bandwidth() -> float:
    """Bytes/s of a jitted sum over a 1 GB float32 array, the best of 5: reading memory, as decoding reads its
    weights. (A copy's figure is lower here and measures the page faults of its fresh output buffer.)"""
    big = jnp.ones(256 * 1024 * 1024, jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(big))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(total(big))
        best = min(best, time.perf_counter() - start)
    return big.nbytes / best


def weight_bytes_per_token(params) -> int:
    """Bytes of the arrays a decode step reads: every parameter but the (untied) embedding table, of which a
    step gathers one row, and the position table."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[0].key in ("embed", "pos_embed"):
            continue
        total += leaf.size * leaf.dtype.itemsize
    return total


def engine_speed(run: Path, dtype: str, slots: int, steps: int) -> tuple[float, int]:
    cfg, graphdef, params, _, _ = restore_model(open_workdir(run))
    if dtype == "bfloat16":
        cfg.model.dtype = "bfloat16"
        graphdef = abstract_model(cfg.model)[0]
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    engine = Engine(cfg.model, graphdef, params, slots, max_len=256)
    engine.warmup()
    return tokens_per_second(engine, slots, 32, steps), weight_bytes_per_token(params)


LLAMACPP_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, n_batch=64, verbose=False, logits_all=False)
prompt = list(range(10, 42))
for _ in range(2):
    llm.reset()
    start = time.perf_counter(); n = 0
    for token in llm.generate(prompt, temp=0.0, reset=True):
        if n == 0:
            first = time.perf_counter()
        n += 1
        if n == 129:
            break
    end = time.perf_counter()
print(json.dumps({"decode_tps": 128 / (end - first)}))
"""


def llamacpp_speed(gguf: Path, python: Path) -> float:
    done = subprocess.run([str(python), "-c", LLAMACPP_SCRIPT, str(gguf)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["decode_tps"]


def speed(args: argparse.Namespace, work: Path) -> dict:
    base = work / "speed"
    base.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = make_tokenizer(base / "tokenizer", SPEED_SPEC)
    hf_dir = make_hf_checkpoint(base / "hf", tokenizer_dir, SPEED_SPEC)
    run = make_run_dir(base / "run", hf_dir, tokenizer_dir)
    bandwidth = read_bandwidth()
    print(f"[speed] read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for name, dtype in (("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "float32"),
                        ("int4 g128", "float32")):
        source = variant_run(run, name, base) if VARIANTS[name] else run
        for slots in args.batch:
            tps, nbytes = engine_speed(source, dtype, slots, args.steps)
            bound = bandwidth / nbytes
            rows.append({"variant": name, "batch": slots, "tokens_per_s": tps, "weight_bytes": nbytes,
                         "bound_tokens_per_s": bound})
            print(f"[speed] lmjax {name} batch {slots}: {tps:.1f} tokens/s (bandwidth bound at batch 1: "
                  f"{bound:.1f}, weights {nbytes / 1e6:.0f} MB)", flush=True)
    peers = {}
    python = Path(args.llamacpp_python)
    converters = sorted(glob.glob(args.llamacpp_converter))
    if python.is_file() and converters:
        for outtype in ("f32", "f16", "q8_0"):
            gguf = make_gguf(base / f"model-{outtype}.gguf", hf_dir, python, Path(converters[-1]), outtype)
            peers[outtype] = llamacpp_speed(gguf, python)
            print(f"[speed] llama.cpp {outtype} batch 1: {peers[outtype]:.1f} tokens/s", flush=True)
    else:
        print("[speed] llama.cpp skipped: no venv/converter (see tools/bench/serve_artefacts.py)", flush=True)
    return {"bandwidth_bytes_per_s": bandwidth, "lmjax": rows, "llamacpp_batch1": peers}


def summary(quality_rows: list[dict], speed_result: dict | None) -> None:
    if quality_rows:
        base = quality_rows[0]
        print("\n| variant | params MB | held-out bpb | vs float32 | chat ROUGE-L |")
        print("|---|---:|---:|---:|---:|")
        for r in quality_rows:
            print(f"| {r['variant']} | {r['bytes'] / 1e6:.2f} | {r['val_bpb']:.4f} | "
                  f"{(r['val_bpb'] / base['val_bpb'] - 1) * 100:+.2f}% | {r['rouge_l']:.3f} |")
        bpb = {r["variant"]: r["val_bpb"] for r in quality_rows}
        wanda, magnitude = bpb["50% wanda"] - bpb["float32"], bpb["50% magnitude"] - bpb["float32"]
        print(f"50% Wanda's bpb increase / 50% magnitude's: {wanda / magnitude:.2f} (target <= 0.5)")
    if speed_result:
        rows = speed_result["lmjax"]
        tps = {(r["variant"], r["batch"]): r["tokens_per_s"] for r in rows}
        print("\n| lmjax decode | batch | tokens/s | vs float32 | bandwidth bound (batch 1) | share of bound |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            share = f"{r['tokens_per_s'] / r['bound_tokens_per_s']:.0%}" if r["batch"] == 1 else "-"
            print(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                  f"{r['tokens_per_s'] / tps['float32', r['batch']]:.2f}x | {r['bound_tokens_per_s']:.1f} | "
                  f"{share} |")
        peers = speed_result["llamacpp_batch1"]
        for ours, theirs in (("int8", "q8_0"), ("bfloat16", "f16"), ("float32", "f32")):
            if theirs in peers and (ours, 1) in tps:
                print(f"lmjax {ours} / llama.cpp {theirs} at batch 1: {tps[ours, 1] / peers[theirs]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", type=Path, default=Path("runs/quickstart/pretrain"), help="pretrained run")
    parser.add_argument("--chat", default="runs/quickstart/sft",
                        help="chat-tuned run ('' to skip ROUGE-L)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-compress"), help="compressed runs go here")
    parser.add_argument("--val-batches", type=int, default=40, help="held-out batches of 8 rows")
    parser.add_argument("--questions", type=int, default=64, help="held-out chat questions")
    parser.add_argument("--no-quality", action="store_true", help="skip the quality table")
    parser.add_argument("--speed", action="store_true", help="also measure decode speed on gpt2_small-like shapes")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="engine batch sizes (slots)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per batch size")
    parser.add_argument("--llamacpp-python", default=str(DEFAULT_LLAMACPP_PYTHON), help="python of the llama.cpp venv")
    parser.add_argument("--llamacpp-converter", default=DEFAULT_CONVERTER_GLOB, help="convert_hf_to_gguf.py (glob)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    quality_rows = [] if args.no_quality else quality(args, args.work)
    speed_result = speed(args, args.work) if args.speed else None
    (args.work / "results.json").write_text(json.dumps({"quality": quality_rows, "speed": speed_result}, indent=2,
                                                       default=str))
    summary(quality_rows, speed_result)


if __name__ == "__main__":
    main()
