"""Char-level baby GPT: lmjax against a PyTorch peer of nanoGPT's CPU recipe, in time to the same validation loss.

Both train the model of configs/char_baby.py (nanoGPT's README CPU run: 4 layers, 4 heads, d_model 128,
context 64, batch 12, 2000 steps, lr 1e-3, 100 warm-up steps, cosine decay to 1e-4, AdamW (0.9, 0.99),
weight decay 0.1, clipping 1.0, no dropout, tied embeddings) on the characters of Python's documentation
topics (`pydoc_data.topics`, ~0.47 MB, public and shipped with Python): the first 90% trains, the last 10%
validates. The peer is a GPT written here in PyTorch the nanoGPT way (no biases, exact GELU, random
64-character windows, float32, 2 threads, a vocabulary of the text's characters); lmjax runs `lmjax train`
with its config's settings (configs/char_baby.py, or --lmjax-config such as configs/char_speedrun.py: the same
model and data, trained another way) plus any --lmjax-override.

Validation loss is the mean next-character cross-entropy in nats over the validation text cut into
consecutive blocks of 64, the same characters for both (each is one token on both sides), scored in float32
after training from snapshots taken every --eval-every steps, so scoring costs neither side time. The peer's
snapshots are copies in memory; lmjax's are its checkpoints, written in the background while it trains (about a
second each on 2 cores): --eval-every equal to lmjax's steps keeps them out of its time. Wall time runs from
launching a side's process to its last training step's progress line, start-up, data, tokenizer and compilation
included (lmjax's exit, after its final evaluation and checkpoint, is reported apart); the sides run one after
the other, alone. A snapshot's time is when its progress line appeared; lmjax's time to the peer's final loss is
that of its first snapshot at or below it.

    .venv/bin/python tools/bench/char_baby_gpt.py
    .venv/bin/python tools/bench/char_baby_gpt.py --peer-json runs/char_baby/peer.json \\
        --lmjax-override train.optimizer=muon    # an lmjax ablation against the peer run saved before
    .venv/bin/python tools/bench/char_baby_gpt.py --lmjax-config configs/char_speedrun.py --eval-every 400
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmjax.config import load_config
from lmjax.model.loss import token_losses
from lmjax.run.restore import restore_model
from lmjax.run.workdir import Workdir, read_metrics

CONFIG = "configs/char_baby.py"
PROGRESS = re.compile(r"^step\s+(\d+)/\d+ \|")  # the progress lines of both sides


def split_text() -> tuple[str, str]:
    """(train, validation) text: Python's documentation topics in name order, split 90/10."""
    text = "\n".join(topics[name] for name in sorted(topics))
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def val_blocks(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [blocks, seq_len]: consecutive blocks of `ids` and the ids that follow each."""
    n = (len(ids) - 1) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len), ids[1 : n * seq_len + 1].reshape(n, seq_len)


def run_timed(cmd: list[str]) -> tuple[dict[int, float], float]:
    """Runs `cmd`, echoing its output: ({step: seconds from launch to its progress line}, seconds from launch
    to exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    steps = {}
    for line in proc.stdout:
        seconds = time.perf_counter() - start
        print(f"  [{seconds:6.1f}s] {line}", end="", flush=True)
        if m := PROGRESS.match(line):
            steps[int(m.group(1))] = seconds
    if proc.wait():
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with status {proc.returncode}")
    return steps, time.perf_counter() - start


# --- the PyTorch peer -------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP; no biases."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model, bias=False)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = nn.LayerNorm(d_model, bias=False)
        self.fc_in = nn.Linear(d_model, 4 * d_model, bias=False)
        self.fc_out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d_model, dim=2)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(heads.transpose(1, 2).reshape(batch, length, d_model))
        return x + self.fc_out(F.gelu(self.fc_in(self.mlp_norm(x))))


class BabyGPT(nn.Module):
    """GPT-2 shape: token + learned position embeddings, blocks, final LayerNorm, output tied to the token
    embedding. Weights N(0, 0.02), the two residual output projections N(0, 0.02 / sqrt(2 * layers))."""

    def __init__(self, vocab: int, layers: int, heads: int, d_model: int, seq_len: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                out_proj = name.endswith(("attn_out.weight", "fc_out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if out_proj else 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tokens.weight.T


def peer_lr(step: int, cfg) -> float:
    """nanoGPT's schedule: linear warm-up to the peak, then cosine to peak * min_lr_ratio at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    done = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def bench_config(steps: int):
    """configs/char_baby.py, with `steps` training steps if not 0."""
    cfg = load_config(CONFIG)
    cfg.train.steps = steps or cfg.train.steps
    return cfg


def train_peer(out: Path, eval_every: int, seed: int, steps: int) -> None:
    """The peer's process: trains, printing a progress line at each snapshot, then scores the snapshots and
    writes {step: val loss} to `out`."""
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    cfg = bench_config(steps)
    m, t = cfg.model, cfg.train
    train_text, val_text = split_text()
    chars = sorted(set(train_text + val_text))
    index = {c: i for i, c in enumerate(chars)}
    train_ids = torch.tensor([index[c] for c in train_text])
    model = BabyGPT(len(chars), m.num_layers, m.num_heads, m.d_model, m.seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
    windows = torch.Generator().manual_seed(seed)
    snapshots = {}
    for step in range(t.steps):
        starts = torch.randint(len(train_ids) - m.seq_len, (t.batch_size,), generator=windows)
        x = torch.stack([train_ids[s : s + m.seq_len] for s in starts])
        y = torch.stack([train_ids[s + 1 : s + m.seq_len + 1] for s in starts])
        for group in opt.param_groups:
            group["lr"] = peer_lr(step, cfg)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == t.steps:
            print(f"step {step + 1:>6}/{t.steps} | loss {loss.item():.4f}", flush=True)
            snapshots[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = map(torch.from_numpy, val_blocks(np.array([index[c] for c in val_text]), m.seq_len))
    val = {}
    with torch.no_grad():
        for step, state in snapshots.items():
            model.load_state_dict(state)
            val[step] = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    out.write_text(json.dumps({"val": val, "vocab": len(chars), "torch": torch.__version__}))


def run_peer(args: argparse.Namespace) -> dict:
    """Runs the peer in its own process; its figures, also saved to --out/peer.json."""
    scores = args.out / "peer_scores.json"
    cmd = [sys.executable, __file__, "--train-peer", str(scores), "--eval-every", str(args.eval_every),
           "--seed", str(args.seed), "--steps", str(args.steps)]
    load = os.getloadavg()[0]
    times, _ = run_timed(cmd)
    saved = json.loads(scores.read_text())
    result = {"val": {int(step): v for step, v in saved["val"].items()}, "times": times, "vocab": saved["vocab"],
              "torch": saved["torch"], "load_before": load}
    (args.out / "peer.json").write_text(json.dumps(result))
    return result


# --- lmjax ------------------------------------------------------------------------------------------------


def score_lmjax(workdir: Path, steps: list[int], val_text: str) -> dict[int, float]:
    """{step: validation loss} of the run's checkpoints on the validation blocks."""
    wd = Workdir(workdir)
    first = restore_model(wd, steps[0])
    ids = np.array(first.tokenizer.encode(val_text), dtype=np.int32)
    if len(ids) != len(val_text):
        raise SystemExit("lmjax's tokenizer does not give one token per validation character")
    inputs, targets = val_blocks(ids, first.cfg.model.seq_len)
    batch = {"inputs": inputs, "targets": targets, "segment_ids": np.ones_like(inputs),
             "positions": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)}
    mean_loss = jax.jit(lambda params, batch: token_losses(params, first.graphdef, batch).mean())
    return {step: float(mean_loss(restore_model(wd, step).params, batch)) for step in steps}


def run_lmjax(args: argparse.Namespace, data: Path, val_text: str) -> dict:
    """Runs `lmjax train` on --lmjax-config (configs/char_baby.py) in its own process; its figures."""
    workdir = args.out / "lmjax"
    shutil.rmtree(workdir, ignore_errors=True)
    steps = args.steps or load_config(args.lmjax_config).train.steps
    overrides = [f"train.steps={steps}", f"data.train=text:{data}/train.txt", f"data.val=text:{data}/val.txt",
                 "train.eval_every=0",
                 f"train.log_every={args.eval_every}", f"train.ckpt_every={args.eval_every}",
                 f"train.keep_ckpts={steps // args.eval_every + 1}", "train.samples=", *args.lmjax_override]
    cmd = [sys.executable, "-m", "lmjax.cli", "train", "--config", str(args.lmjax_config),
           *[f"--config.{o}" for o in overrides],
           "--workdir", str(workdir)]
    load = os.getloadavg()[0]
    times, exit_s = run_timed(cmd)
    first = read_metrics(workdir / "metrics.jsonl")[0]
    cfg = Workdir(workdir).load_config()
    return {"val": score_lmjax(workdir, sorted(times), val_text), "times": times, "exit_s": exit_s, "load_before": load,
            "vocab": cfg.model.vocab_size, "dtype": cfg.model.dtype,
            **{k: first[k] for k in ("first_step_s", "compile_s", "programs_compiled", "compile_cache_hits")}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/char_baby"), help="data, runs and results go here")
    p.add_argument("--eval-every", type=int, default=100, help="steps between snapshots (scored after training)")
    p.add_argument("--lmjax-config", type=Path, default=Path(CONFIG),
                   help="lmjax's config (the peer always follows configs/char_baby.py), e.g. configs/char_speedrun.py")
    p.add_argument("--lmjax-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an lmjax config override for this run (repeatable), e.g. model.dtype=float32")
    p.add_argument("--peer-json", type=Path, help="take the peer's figures from this earlier peer.json, not a new run")
    p.add_argument("--seed", type=int, default=0, help="the peer's initialisation and data order")
    p.add_argument("--steps", type=int, default=0, help="training steps of both sides; 0 = each side's config's")
    p.add_argument("--train-peer", type=Path, help=argparse.SUPPRESS)  # the peer's own process
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.train_peer:
        train_peer(args.train_peer, args.eval_every, args.seed, args.steps)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    train_text, val_text = split_text()
    data = args.out / "data"
    data.mkdir(exist_ok=True)
    (data / "train.txt").write_text(train_text)
    (data / "val.txt").write_text(val_text)
    print(f"{len(train_text):,} train / {len(val_text):,} validation characters; {os.cpu_count()} cores",
          flush=True)
    if args.peer_json:
        peer = json.loads(args.peer_json.read_text())
        peer["val"], peer["times"] = ({int(k): v for k, v in peer[key].items()} for key in ("val", "times"))
    else:
        print("PyTorch peer:", flush=True)
        peer = run_peer(args)
    print("lmjax:", flush=True)
    lm = run_lmjax(args, data, val_text)

    last = max(peer["val"])
    target = peer["val"][last]
    reached = next((step for step in sorted(lm["val"]) if lm["val"][step] <= target), None)
    lm_wall, peer_wall = lm["times"][max(lm["times"])], peer["times"][last]
    lm_reach = lm["times"][reached] if reached else None
    for step in sorted(lm["val"]):
        print(f"step {step:>5}: lmjax {lm['val'][step]:.4f} at {lm['times'][step]:6.1f}s | "
              f"peer {peer['val'].get(step, float('nan')):.4f} at {peer['times'].get(step, float('nan')):6.1f}s")
    figures = {
        "peer_val_loss": round(target, 4), "lmjax_val_loss": round(lm["val"][max(lm["val"])], 4),
        "peer_wall_s": round(peer_wall, 1), "lmjax_wall_s": round(lm_wall, 1),
        "lmjax_wall_over_peer": round(lm_wall / peer_wall, 3),
        "lmjax_time_to_peer_loss_s": lm_reach and round(lm_reach, 1), "lmjax_step_to_peer_loss": reached,
        "lmjax_time_to_peer_loss_over_peer_wall": lm_reach and round(lm_reach / peer_wall, 3),
        "lmjax_first_step_s": round(lm["first_step_s"], 1), "lmjax_compile_s": round(lm["compile_s"], 1),
        "lmjax_programs_from_compile_cache": f"{lm['compile_cache_hits']}/{lm['programs_compiled']}",
        "lmjax_exit_s": round(lm["exit_s"], 1), "lmjax_dtype": lm["dtype"], "lmjax_vocab": lm["vocab"],
        "peer_vocab": peer["vocab"], "torch": peer["torch"], "jax": jax.__version__,
        "load_average_before": {"peer": round(peer["load_before"], 2), "lmjax": round(lm["load_before"], 2)},
        "lmjax_overrides": args.lmjax_override,
    }
    (args.out / "result.json").write_text(json.dumps({**figures, "lmjax": lm, "peer": peer}, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
