"""The trainer: everything stateful around the pure train step (data, mesh, checkpoints, logging,
signals). `train(cfg, workdir)` starts a run, or resumes it exactly if the workdir has checkpoints."""

import functools
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from lmjax.config import ConfigError, base_config, validate
from lmjax.data.chat import read_chat
from lmjax.data.loaders import loader_count
from lmjax.data.shards import parse_prepared
from lmjax.data.sources import read_documents
from lmjax.data.tokenizer import Tokenizer, train_tokenizer
from lmjax.infer.sampler import Sampler
from lmjax.model.params import abstract_model, count_params, flops_per_token
from lmjax.parallel import distributed
from lmjax.parallel.mesh import batch_shards, check_model_fits_mesh, make_mesh, mesh_shape
from lmjax.parallel.rules import logical_to_spec, tree_shardings, use_rules
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.metrics import MetricsWriter, format_duration, log, measure_matmul_peak, plot_losses, read_metrics
from lmjax.train.objectives import BatchShardings, dpo_objective, global_batch, lm_objective, with_sharding
from lmjax.train.optim import lr_schedule, make_optimizer
from lmjax.train.step import init_state
from lmjax.workdir import Workdir, init_params_from


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


def _source_texts(spec: str):
    if spec.startswith("chat:"):
        return (m["content"] for c in read_chat(spec[len("chat:"):]) for m in c)
    return read_documents(spec)


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
    batch_ways = batch_shards(rules, dict(mesh.shape))
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
    make_objective = dpo_objective if t_cfg.objective == "dpo" else lm_objective
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
            state = ckpt.restore(with_sharding(abstract_state, state_sharding), data_iter)
            first_step = int(jax.device_get(state["step"]))
            records = [r for r in read_metrics(wd.metrics_path) if r["step"] <= first_step]
            _rewrite_metrics(wd.metrics_path, records)
            elapsed_before = records[-1]["elapsed_s"] if records else 0.0
            log(f"resumed from checkpoint at step {first_step}")
        else:
            state = init_fn()
            if cfg.init_from:
                state["params"] = init_params_from(cfg, with_sharding(abstract_state["params"],
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
                state, metrics = objective.step_fn(state, global_batch(batch, shardings.train))
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


def write_samples(sampler: Sampler, prompts: list[str], path: Path, seed: int) -> None:
    """Draws one completion per prompt, prints them and saves them to `path`."""
    texts = sampler.generate(prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=seed)
    shown = "".join(f"--- {p!r}\n{p}{t}\n" for p, t in zip(prompts, texts, strict=True))
    path.write_text(shown)
    log(f"samples (also in {path}):\n{shown}")


def _rewrite_metrics(path: Path, records: list[dict]) -> None:
    """Keeps only `records` in metrics.jsonl (steps after the restored checkpoint are redone)."""
    if jax.process_index() != 0:
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
