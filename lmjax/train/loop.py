"""The trainer: everything stateful around the pure train step (data, mesh, checkpoints, logging,
signals). `train(cfg, workdir)` starts a run, or resumes it exactly if the workdir has checkpoints."""

import functools
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from lmjax.config import ConfigError, base_config, validate
from lmjax.data.chat import read_chat
from lmjax.data.loaders import Loaders, loader_count
from lmjax.data.pipeline import eval_batches, tokenize_conversations, tokenize_documents, train_iterator
from lmjax.data.shards import parse_prepared
from lmjax.data.sources import read_documents
from lmjax.data.tokenizer import Tokenizer, train_tokenizer
from lmjax.eval.baselines import unigram_bpb
from lmjax.infer.sampler import Sampler
from lmjax.model.params import abstract_model, count_params, flops_per_token
from lmjax.parallel import distributed
from lmjax.parallel.mesh import check_model_fits_mesh, make_mesh, mesh_shape
from lmjax.parallel.rules import logical_to_spec, tree_shardings, use_rules
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.dpo import (
    dpo_eval_step,
    dpo_step,
    eval_pair_batches,
    evaluate_pairs,
    pair_batches,
    read_pairs,
    split_heldout,
)
from lmjax.train.metrics import MetricsWriter, format_duration, measure_matmul_peak, plot_losses, read_metrics
from lmjax.train.optim import lr_schedule, make_optimizer
from lmjax.train.step import eval_step, init_state, train_step
from lmjax.workdir import Workdir


def log(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def load_or_train_tokenizer(cfg: ConfigDict, wd: Workdir) -> Tokenizer:
    """The run's tokenizer: the one in the workdir, else `tokenizer.path`, else the `init_from` run's,
    else the one of a prepared data.train directory, else one trained on data.train."""
    if (wd.tokenizer_dir / "tokenizer.model").is_file():
        return Tokenizer.load(wd.tokenizer_dir)
    wd.path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=wd.path, prefix=".tokenizer-"))
    prepared = parse_prepared(cfg.data.train)
    source = (cfg.tokenizer.path or (str(Workdir(cfg.init_from).tokenizer_dir) if cfg.init_from else "")
              or (str(prepared[0] / "tokenizer") if prepared else ""))
    if source:
        Tokenizer.load(source)
        shutil.copy(Path(source) / "tokenizer.model", tmp)
        log(f"using the tokenizer of {source}")
    else:
        start = time.time()
        train_tokenizer(_source_texts(cfg.data.train), cfg.tokenizer.vocab_size, tmp, kind=cfg.tokenizer.kind)
        log(f"trained a {cfg.tokenizer.kind} tokenizer ({cfg.tokenizer.vocab_size} tokens) on "
            f"{cfg.data.train} in {time.time() - start:.1f}s")
    os.replace(tmp, wd.tokenizer_dir)
    return Tokenizer.load(wd.tokenizer_dir)


def load_chunks(spec: str, tokenizer: Tokenizer, seq_len: int) -> list[np.ndarray]:
    """Training chunks of a source: documents, or conversations (`chat:...`) with assistant-only loss."""
    if spec.startswith("chat:"):
        return tokenize_conversations(read_chat(spec[len("chat:"):]), tokenizer, seq_len)
    return tokenize_documents(read_documents(spec), tokenizer, seq_len)


def _source_texts(spec: str):
    if spec.startswith("chat:"):
        return (m["content"] for c in read_chat(spec[len("chat:"):]) for m in c)
    return read_documents(spec)


SHAPE_KEYS = ("family", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_model", "d_ff",
              "tie_embeddings", "param_dtype")


def init_params_from(cfg: ConfigDict, abstract_params):
    """Parameters of the latest checkpoint of the run `cfg.init_from`, after checking its model shapes."""
    source = Workdir(cfg.init_from)
    source_model = source.load_config().model
    diff = {k: (source_model[k], cfg.model[k]) for k in SHAPE_KEYS if source_model[k] != cfg.model[k]}
    if cfg.model.family == "gpt2" and source_model.seq_len < cfg.model.seq_len:
        diff["seq_len"] = (source_model.seq_len, cfg.model.seq_len)
    if diff:
        raise ConfigError(f"init_from {source.path} has a different model: "
                          + ", ".join(f"{k} {a} (there) != {b} (here)" for k, (a, b) in diff.items()))
    ckpt = Checkpointer(source.checkpoint_dir)
    try:
        return ckpt.restore_params(abstract_params)
    finally:
        ckpt.close()


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints and exits).
    With several processes JAX's preemption service handles SIGTERM instead, so that every process
    stops after the same step."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def check(self, step: int) -> str | None:
        """The signal to stop on after `step`, if any (the same on every process)."""
        if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
            self.signal = "SIGTERM"
        return self.signal

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last validation metrics."""
    cfg = ConfigDict(cfg.to_dict())
    validate(cfg)
    distributed.initialize(cfg)
    wd = Workdir(workdir)
    t_cfg, m_cfg = cfg.train, cfg.model
    check_model_fits_mesh(m_cfg, mesh_shape(cfg.mesh, jax.device_count()))  # before any data or compilation
    if t_cfg.objective == "dpo" and not cfg.init_from:
        raise ConfigError("train.objective=dpo needs init_from: the run to start from, which is also the frozen "
                          "reference")
    cfg.data.loaders = loader_count(cfg.data.loaders, jax.process_count(), t_cfg.batch_size, t_cfg.grad_accum)
    if jax.process_index() == 0:
        load_or_train_tokenizer(cfg, wd)
    distributed.barrier("tokenizer")  # the other processes read the one process 0 put in the (shared) workdir
    tokenizer = load_or_train_tokenizer(cfg, wd)
    if m_cfg.vocab_size == 0:
        m_cfg.vocab_size = tokenizer.vocab_size
    if m_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size {m_cfg.vocab_size} < tokenizer vocabulary {tokenizer.vocab_size}")
    if jax.process_index() == 0:
        saved = ConfigDict(cfg.to_dict())
        saved.distributed = base_config().distributed  # how processes join is not part of the run
        wd.save_config(saved)

    mesh = make_mesh(cfg.mesh)
    rules = dict(cfg.mesh.rules)
    n_proc, micro = jax.process_count(), t_cfg.batch_size // t_cfg.grad_accum
    batch_ways = math.prod(mesh.shape[a] for a in filter(None, rules["batch"].split(",")))
    if micro % batch_ways or micro % n_proc:
        raise ConfigError(f"micro-batch {micro} (train.batch_size / grad_accum) must be divisible by the "
                          f"{batch_ways} batch shards of the mesh and by {n_proc} processes")

    seq_len = m_cfg.seq_len
    graphdef, abstract_params, axes = abstract_model(m_cfg)
    tx = make_optimizer(t_cfg)
    schedule = lr_schedule(t_cfg)
    abstract_state = jax.eval_shape(functools.partial(init_state, m_cfg, tx, t_cfg.seed))
    state_sharding = tree_shardings(mesh, rules, abstract_state, axes)
    shardings = BatchShardings(
        train=NamedSharding(mesh, logical_to_spec((None, "batch", "length"), rules, mesh.shape)),
        eval=NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh.shape)),
        replicated=NamedSharding(mesh, PartitionSpec()))
    make_objective = _dpo_objective if t_cfg.objective == "dpo" else _lm_objective
    objective = make_objective(cfg, tokenizer, graphdef, tx, abstract_state["params"], state_sharding, shardings)
    data_iter = objective.data_iter

    n_params = count_params(abstract_params)
    flops_token = flops_per_token(m_cfg, abstract_params)
    peak = t_cfg.peak_tflops * 1e12 or measure_matmul_peak(m_cfg.dtype)
    tokens_per_step = t_cfg.batch_size * seq_len * objective.rows_per_example
    log(f"model: {m_cfg.family}, {n_params / 1e6:.2f}M params, {flops_token / 1e6:.1f} MFLOP/token; "
        f"mesh {dict(mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s/device ({m_cfg.dtype})")

    writer = MetricsWriter(wd.metrics_path, wd.tb_dir)
    ckpt = Checkpointer(wd.checkpoint_dir, t_cfg.keep_ckpts)
    with use_rules(mesh, rules):
        init_fn = jax.jit(functools.partial(init_state, m_cfg, tx, t_cfg.seed), out_shardings=state_sharding)
        if ckpt.latest_step() is not None:
            state = ckpt.restore(_with_sharding(abstract_state, state_sharding), data_iter)
            first_step = int(jax.device_get(state["step"]))
            records = [r for r in read_metrics(wd.metrics_path) if r["step"] <= first_step]
            _rewrite_metrics(wd.metrics_path, records)
            elapsed_before = records[-1]["elapsed_s"] if records else 0.0
            log(f"resumed from checkpoint at step {first_step}")
        else:
            state = init_fn()
            if cfg.init_from:
                state["params"] = init_params_from(cfg, _with_sharding(abstract_state["params"],
                                                                       state_sharding["params"]))
                log(f"initialised parameters from {cfg.init_from}")
            first_step, elapsed_before = 0, 0.0
            _rewrite_metrics(wd.metrics_path, [])

        last_val: dict = {}
        run_start = interval_start = time.time()
        interval_metrics: list = []
        step = first_step
        with _StopFlag() as stop:
            while step < t_cfg.steps:
                batch = next(data_iter)
                batch = {k: v.reshape(t_cfg.grad_accum, -1, seq_len) for k, v in batch.items()}
                state, metrics = objective.step_fn(state, _global(batch, shardings.train))
                interval_metrics.append(metrics)
                step += 1
                record = {}
                if step % t_cfg.log_every == 0 or step == t_cfg.steps:
                    fetched = jax.device_get(interval_metrics)
                    seconds = time.time() - interval_start
                    tok_s = tokens_per_step * len(fetched) / seconds
                    record.update(
                        train_loss=float(np.mean([m["loss"] for m in fetched])),
                        grad_norm=float(np.mean([m["grad_norm"] for m in fetched])),
                        lr=float(schedule(step - 1)), tokens_per_sec=tok_s,
                        mfu=tok_s * flops_token / (peak * jax.device_count()),
                        **{f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in ("accuracy", "margin")
                           if k in fetched[0]})
                    eta = (t_cfg.steps - step) * seconds / len(fetched)
                    log(f"step {step:>6}/{t_cfg.steps} | loss {record['train_loss']:.4f} | "
                        f"{tok_s:,.0f} tok/s | MFU {100 * record['mfu']:.1f}% | ETA {format_duration(eta)}")
                    interval_metrics, interval_start = [], time.time()
                if (t_cfg.eval_every and step % t_cfg.eval_every == 0) or step == t_cfg.steps:
                    last_val = objective.evaluate(state["params"])
                    record.update(last_val)
                    log(f"step {step:>6} | {objective.describe(last_val)}")
                    interval_start = time.time()
                if record:
                    record.update(step=step, elapsed_s=elapsed_before + time.time() - run_start)
                    writer.write(record)
                if stop.check(step) or step % t_cfg.ckpt_every == 0 or step == t_cfg.steps:
                    ckpt.save(state, data_iter)
                if stop.signal:
                    log(f"{stop.signal}: checkpoint saved at step {step}; run the same command to resume")
                    break
        if not last_val and not stop.signal:
            last_val = objective.evaluate(state["params"])
            log(f"step {step:>6} | {objective.describe(last_val)} (resumed)")
    ckpt.close()
    writer.close()
    if jax.process_index() == 0:
        plot_losses(read_metrics(wd.metrics_path), wd.plot_path, title=f"{m_cfg.family} {n_params / 1e6:.1f}M")
    if jax.process_count() == 1 and t_cfg.samples and not stop.signal:
        write_samples(Sampler(m_cfg, graphdef, state["params"], tokenizer), list(t_cfg.samples), wd.samples_path,
                      t_cfg.seed)
    return {"step": step, "stopped_by": stop.signal or "", **objective.result, **last_val}


class BatchShardings(NamedTuple):
    """Layouts of train batches ([grad_accum, batch, length]), eval batches ([batch, length]) and scalars."""
    train: NamedSharding
    eval: NamedSharding
    replicated: NamedSharding


class Objective(NamedTuple):
    """What `train` optimises: its data, jitted step and evaluation (`train.objective`)."""
    data_iter: Loaders  # this process's rows of each global train batch, checkpointable
    step_fn: Callable  # (state, global batch) -> (state, metrics with loss and grad_norm)
    evaluate: Callable  # params -> validation metrics
    describe: Callable  # validation metrics -> one log line
    rows_per_example: int  # sequences per batch example, for tokens/s
    result: dict  # extra entries of train()'s result


def _lm_objective(cfg: ConfigDict, tokenizer: Tokenizer, graphdef, tx, abstract_params, state_sharding,
                  shardings: BatchShardings) -> Objective:
    """Next-token prediction on documents or conversations; validation loss, perplexity and bits per byte."""
    t_cfg, seq_len = cfg.train, cfg.model.seq_len
    n_proc, micro = jax.process_count(), t_cfg.batch_size // t_cfg.grad_accum
    start = time.time()
    train_chunks = load_chunks(cfg.data.train, tokenizer, seq_len)
    val_chunks = load_chunks(cfg.data.val, tokenizer, seq_len)
    n_train_tokens = sum(c.shape[-1] - 1 for c in train_chunks)
    log(f"data: {n_train_tokens:,} train tokens ({len(train_chunks):,} chunks), "
        f"{sum(c.shape[-1] - 1 for c in val_chunks):,} val tokens, tokenized in {time.time() - start:.1f}s")
    baseline_bpb = unigram_bpb(train_chunks, val_chunks, tokenizer.token_bytes())
    log(f"unigram baseline: val bpb {baseline_bpb:.3f}")
    data_iter = _loaders(cfg, lambda k, count, rows: train_iterator(train_chunks, seq_len, rows, t_cfg.seed, k,
                                                                    count))
    val_data = eval_batches(val_chunks, seq_len, micro // n_proc, t_cfg.eval_steps, jax.process_index(), n_proc)
    token_bytes = jax.device_put(jnp.asarray(tokenizer.token_bytes(), jnp.float32), shardings.replicated)
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=cfg.model.dropout > 0),
                      in_shardings=(state_sharding, shardings.train),
                      out_shardings=(state_sharding, shardings.replicated), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                      in_shardings=(state_sharding["params"], shardings.eval, shardings.replicated))

    def evaluate(params) -> dict:
        sums = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in val_data:
            out = eval_fn(params, _global(batch, shardings.eval), token_bytes)
            sums = {k: sums[k] + out[k] for k in sums}
        sums = jax.device_get(sums)
        loss = float(sums["loss_sum"] / max(sums["tokens"], 1))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_bpb": float(sums["loss_sum"] / math.log(2) / max(sums["bytes"], 1))}

    def describe(v: dict) -> str:
        return (f"val loss {v['val_loss']:.4f} | ppl {v['val_ppl']:.2f} | bpb {v['val_bpb']:.3f} "
                f"(unigram {baseline_bpb:.3f})")

    return Objective(data_iter, step_fn, evaluate, describe, 1, {"unigram_bpb": baseline_bpb})


def _dpo_objective(cfg: ConfigDict, tokenizer: Tokenizer, graphdef, tx, abstract_params, state_sharding,
                   shardings: BatchShardings) -> Objective:
    """DPO (lmjax/train/dpo.py) on the preference pairs of data.train against the frozen `init_from`
    parameters; held out: the pairs of data.val, or every 10th pair of data.train if data.val is ""."""
    t_cfg, seq_len = cfg.train, cfg.model.seq_len
    n_proc, micro = jax.process_count(), t_cfg.batch_size // t_cfg.grad_accum
    pairs = read_pairs(cfg.data.train)
    train_pairs, val_pairs = (pairs, read_pairs(cfg.data.val)) if cfg.data.val else split_heldout(pairs)
    log(f"data: {len(train_pairs):,} train and {len(val_pairs):,} held-out preference pairs")
    data_iter = _loaders(cfg, lambda k, count, rows: pair_batches(train_pairs, tokenizer, seq_len, rows,
                                                                  t_cfg.seed, k, count))
    val_data = [_global(b, shardings.eval) for b in eval_pair_batches(
        val_pairs, tokenizer, seq_len, micro // n_proc, t_cfg.eval_steps, jax.process_index(), n_proc)]
    params_sharding = state_sharding["params"]
    ref_params = init_params_from(cfg, _with_sharding(abstract_params, params_sharding))
    step = jax.jit(functools.partial(dpo_step, graphdef=graphdef, tx=tx, beta=t_cfg.dpo_beta),
                   in_shardings=(state_sharding, params_sharding, shardings.train),
                   out_shardings=(state_sharding, shardings.replicated), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(dpo_eval_step, graphdef=graphdef, beta=t_cfg.dpo_beta),
                      in_shardings=(params_sharding, params_sharding, shardings.eval))

    def describe(v: dict) -> str:
        return (f"val DPO loss {v['val_loss']:.4f} | preference accuracy {v['val_accuracy']:.3f} | "
                f"log-ratio margin {v['val_margin']:.3f}")

    return Objective(data_iter, lambda state, batch: step(state, ref_params, batch),
                     lambda params: evaluate_pairs(eval_fn, params, ref_params, val_data), describe, 2, {})


def _loaders(cfg: ConfigDict, make) -> Loaders:
    """This process's share of the `data.loaders` train loaders built by `make(index, count, rows)`."""
    return Loaders(make, cfg.data.loaders, cfg.train.batch_size, cfg.train.grad_accum, jax.process_index(),
                   jax.process_count())


def _with_sharding(abstract, shardings):
    """`abstract` shapes with `shardings` attached (what Orbax restores into)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


def write_samples(sampler: Sampler, prompts: list[str], path: Path, seed: int) -> None:
    """Draws one completion per prompt, prints them and saves them to `path`."""
    texts = sampler.generate(prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=seed)
    shown = "".join(f"--- {p!r}\n{p}{t}\n" for p, t in zip(prompts, texts, strict=True))
    path.write_text(shown)
    log(f"samples (also in {path}):\n{shown}")


def _global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _rewrite_metrics(path: Path, records: list[dict]) -> None:
    """Keeps only `records` in metrics.jsonl (steps after the restored checkpoint are redone)."""
    if jax.process_index() != 0:
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
