"""The trainer: everything stateful around the pure train step (data, mesh, checkpoints, logging,
signals). `train(cfg, workdir)` starts a run, or resumes it exactly if the workdir has checkpoints.

    prepare_run      config checks, resume rules, tokenizer, config.json         (no data, no compilation)
    restore_or_init  the train state: from the checkpoint, from init_from, or random
    run_steps        the loop: step, log, evaluate, checkpoint, stop on a signal
"""

import functools
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

from lmjax.config import ConfigError, base_config, config_diff, validate
from lmjax.corpus.stdlib_docs import cache_dir
from lmjax.infer.sampler import Sampler
from lmjax.input import specs
from lmjax.input.loaders import loader_count
from lmjax.model.attention_kernels import resolve_attention
from lmjax.model.config import ModelConfig
from lmjax.model.lora import LoraSpec, adapter_axes, attach
from lmjax.model.params import abstract_model, count_params, flops_per_token
from lmjax.parallel import distributed
from lmjax.parallel.mesh import batch_shards, make_mesh, mesh_shape
from lmjax.parallel.rules import logical_to_spec, tree_shardings, use_rules
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.restore import check_init_from, init_params_from, lora_base, starting_model
from lmjax.run.workdir import Workdir, read_metrics
from lmjax.text.io import write_jsonl
from lmjax.text.tokenizer import Tokenizer, describe_size, has_tokenizer, load_tokenizer, train_tokenizer
from lmjax.train.metrics import (
    MetricsWriter,
    StartupClock,
    describe_first_step,
    format_duration,
    log,
    mfu_peak,
    peak_cache,
    plot_losses,
    training_dtype,
)
from lmjax.train.objectives import (
    BatchShardings,
    Objective,
    RunContext,
    dpo_objective,
    global_batch,
    lm_objective,
    with_sharding,
)
from lmjax.train.optim import lr_schedule, make_optimizer
from lmjax.train.plan import check_sharding
from lmjax.train.step import init_lora_state, init_state, start_state

# Knobs a resumed run may change; any other difference from the run's config.json is refused. `mesh.*` says
# how the run is laid out on devices, not what it computes (checkpoints move between meshes); a started run
# reads its own copy of the tokenizer, whatever `tokenizer.path` says (the loader fingerprint checks it).
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_ckpts",
             "train.samples", "train.peak_tflops", "train.compile_cache", "tokenizer.path", "mesh.*")
# Knobs whose default means "decided at the first start" (then recorded): a resume that leaves them at the
# default keeps the recorded value.
DECIDED_AT_START = {"model.dtype": "auto", "model.vocab_size": 0, "data.loaders": 0, "init_from_step": -1,
                    "train.schedule_steps": 0}


def resume_config(cfg: ConfigDict, wd: Workdir) -> ConfigDict:
    """The config to train `wd` with: `cfg` for a new run; for a started one (config.json present) `cfg`
    after checking that it differs from the saved config only in RESUMABLE knobs. A new fine-tuning run
    records which checkpoint step of init_from it starts from (checked for shapes: no data read yet)."""
    cfg = ConfigDict(cfg.to_dict())
    if not wd.has_config():
        if cfg.init_from:
            cfg.model = starting_model(cfg)
            cfg.init_from_step = check_init_from(cfg)
            if cfg.train.lora.rank > 0:  # its checkpoints need the base again wherever they are restored
                cfg.init_from = str(Path(cfg.init_from).absolute())
        return cfg
    saved = wd.load_config()
    for key, default in DECIDED_AT_START.items():
        group, _, leaf = key.rpartition(".")
        node, saved_node = (cfg[group], saved[group]) if group else (cfg, saved)
        if node[leaf] == default:
            node[leaf] = saved_node[leaf]
    changed = {k: v for k, v in config_diff(saved, cfg).items()
               if k not in RESUMABLE and not k.startswith(("mesh.", "distributed."))}
    if changed:
        raise ConfigError(f"{wd.path} was started with another config; a resumed run may change only "
                          f"{', '.join(RESUMABLE)}. Refused: "
                          + "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
                          + ". Start a new run (another --workdir, with --config.init_from to keep the weights)")
    return cfg


def use_compile_cache(enabled: bool) -> None:
    """With `enabled` (train.compile_cache), JAX keeps the programs it compiles in `cache_dir()/jax-compile`
    and loads them when a later run compiles the same ones. A cache directory the user gave JAX
    (JAX_COMPILATION_CACHE_DIR) is kept. Takes effect only before the process's first compilation."""
    if not enabled or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax-compile"))
    # JAX caches only programs that took a second to compile; start-up compiles many smaller ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def load_or_train_tokenizer(cfg: ConfigDict, wd: Workdir) -> Tokenizer:
    """The run's tokenizer: the one in the workdir, else `tokenizer.path`, else the `init_from` run's,
    else the one of a prepared data.train directory, else one trained on data.train."""
    if has_tokenizer(wd.tokenizer_dir):
        return load_tokenizer(wd.tokenizer_dir)
    wd.path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=wd.path, prefix=".tokenizer-"))
    try:
        prepared = specs.prepared_tokenizer(cfg.data.train)
        source = (cfg.tokenizer.path or (str(Workdir(cfg.init_from).tokenizer_dir) if cfg.init_from else "")
                  or (str(prepared) if prepared else ""))
        if source:
            load_tokenizer(source).save(tmp)
            log(f"using the tokenizer of {source}")
        else:
            start = time.time()
            k_cfg = cfg.tokenizer
            trained = train_tokenizer(specs.texts(cfg.data.train), k_cfg.vocab_size, tmp, kind=k_cfg.kind)
            log(f"trained a {k_cfg.kind} tokenizer ({describe_size(trained, k_cfg.kind, k_cfg.vocab_size)}) on "
                f"{cfg.data.train} in {time.time() - start:.1f}s")
        tmp.rename(wd.tokenizer_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(wd.tokenizer_dir)


def prepare_run(cfg: ConfigDict, wd: Workdir) -> tuple[ConfigDict, Tokenizer]:
    """Checks `cfg` against the devices, the workdir and init_from, settles the tokenizer and the knobs
    decided at the first start, and saves config.json. Reads no training data and compiles nothing."""
    validate(cfg)
    if cfg.model.dtype == "float16":
        raise ConfigError("model.dtype=float16 cannot train: lmjax has no loss scaling, so small gradients vanish "
                          "in float16; train in bfloat16 or float32 (float16 is fine for inference)")
    distributed.initialize(cfg)  # before anything asks for the backend, which would start JAX single-process
    if cfg.init_model and not cfg.init_from:
        raise ConfigError("init_model takes the model from init_from: set --config.init_from=RUN (the imported or "
                          "pretrained run to fine-tune)")
    if cfg.train.objective == "dpo" and not cfg.init_from:
        raise ConfigError("train.objective=dpo needs init_from: the run to start from, which is also the frozen "
                          "reference")
    if cfg.train.lora.rank > 0 and not cfg.init_from:
        raise ConfigError("train.lora needs init_from: the run whose weights the adapters fine-tune")
    cfg = resume_config(cfg, wd)  # a resumed run keeps the dtype it started in
    backend = jax.default_backend()
    if cfg.model.dtype == "auto":
        cfg.model.dtype, why = training_dtype(backend, peak_cache())
        log(f"model.dtype=auto: training in {cfg.model.dtype} ({why})")
    if cfg.model.attention == "auto":
        head_dim = ModelConfig.from_config(cfg.model).head_dim
        chosen = resolve_attention("auto", backend, cfg.model.dtype, head_dim, cfg.model.seq_len)
        log(f"model.attention=auto: {chosen} attention on {backend}")
    for line in check_sharding(cfg, mesh_shape(cfg.mesh, jax.device_count())):
        log(line)
    t_cfg = cfg.train
    cfg.data.loaders = loader_count(cfg.data.loaders, jax.process_count(), t_cfg.batch_size, t_cfg.grad_accum)
    if jax.process_index() == 0:
        load_or_train_tokenizer(cfg, wd)
    distributed.barrier("tokenizer")  # the other processes read the one process 0 put in the (shared) workdir
    tokenizer = load_or_train_tokenizer(cfg, wd)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    if t_cfg.schedule_steps == 0:
        t_cfg.schedule_steps = t_cfg.steps
    elif t_cfg.steps > t_cfg.schedule_steps:
        log(f"train.steps {t_cfg.steps} > train.schedule_steps {t_cfg.schedule_steps}: the learning rate stays at "
            f"its final value after step {t_cfg.schedule_steps} (start a new run with init_from for a new schedule)")
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} < tokenizer vocabulary {tokenizer.vocab_size}")
    if jax.process_index() == 0:
        saved = ConfigDict(cfg.to_dict())
        saved.distributed = base_config().distributed  # how processes join is not part of the run
        wd.save_config(saved)
        log("config, where it differs from the defaults: " + ", ".join(
            f"{k}={new!r}" for k, (_, new) in config_diff(base_config(), saved).items()))
    return cfg, tokenizer


def restore_or_init(cfg: ConfigDict, ckpt: Checkpointer, objective: Objective, abstract_state, state_sharding,
                    tx, ref_params=None, init_lora=None):
    """(train state, its step): the latest checkpoint's (with the data loaders moved to its position), else
    step 0 of a LoRA run (`init_lora()`: fresh adapters), else step 0 from init_from's parameters (restored
    straight into their shardings; no random state is built), else step 0 of a new model. DPO passes its
    reference (`ref_params`, the same weights) to start from."""
    if ckpt.latest_step() is not None:
        state = ckpt.restore(with_sharding(abstract_state, state_sharding), objective.data_iter)
        step = int(jax.device_get(state["step"]))
        log(f"resumed from checkpoint at step {step}")
        return state, step
    if init_lora is not None:
        log(f"LoRA adapters on the frozen weights of {cfg.init_from} (step {cfg.init_from_step})")
        return jax.jit(init_lora, out_shardings=state_sharding)(), 0
    seed = cfg.train.seed
    if cfg.init_from:
        if ref_params is not None:
            params = jax.tree.map(lambda p: p.copy(), ref_params)
        else:
            params = init_params_from(cfg, with_sharding(abstract_state["params"], state_sharding["params"]))
        start = jax.jit(functools.partial(start_state, tx=tx, seed=seed), out_shardings=state_sharding,
                        donate_argnums=0)
        log(f"initialised parameters from {cfg.init_from} (step {cfg.init_from_step})")
        return start(params), 0
    return jax.jit(functools.partial(init_state, cfg.model, tx, seed), out_shardings=state_sharding)(), 0


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints and exits); a
    second SIGINT (Ctrl-C) interrupts at once. With several processes JAX's preemption service handles
    SIGTERM instead, so that every process stops after the same step."""

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
        if signum == signal.SIGINT and self.signal is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            log("Ctrl-C: stopping after this step with a checkpoint (press again to stop at once, without one)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_steps(cfg: ConfigDict, objective: Objective, state, first_step: int, ckpt: Checkpointer,
              writer: MetricsWriter, wd: Workdir, train_sharding: NamedSharding, flops_token: float, peak: float,
              startup: StartupClock):
    """Trains from `first_step` to train.steps (or a stop signal); returns (state, step, last validation
    metrics, the signal that stopped it or None). The first step's record says how long `startup` took."""
    t_cfg, seq_len = cfg.train, cfg.model.seq_len
    schedule = lr_schedule(t_cfg)
    tokens_per_step = t_cfg.batch_size * seq_len * objective.rows_per_example
    records = [r for r in read_metrics(wd.metrics_path) if r["step"] <= first_step]
    _rewrite_metrics(wd.metrics_path, records)
    elapsed_before = records[-1]["elapsed_s"] if records else 0.0
    last_val: dict = {}
    run_start = interval_start = time.time()
    interval_metrics: list = []
    first: dict = {}
    step = first_step
    data_iter = objective.data_iter
    with _StopFlag() as stop:
        while step < t_cfg.steps:
            batch = next(data_iter)
            batch = {k: v.reshape(t_cfg.grad_accum, -1, seq_len) for k, v in batch.items()}
            state, metrics = objective.step_fn(state, global_batch(batch, train_sharding))
            interval_metrics.append(metrics)
            step += 1
            record = {}
            if step == first_step + 1:
                jax.block_until_ready(metrics)
                first = startup.first_step()  # goes into the first logged record, with its train loss
                log(describe_first_step(first))
            if step % t_cfg.log_every == 0 or step == t_cfg.steps:
                record.update(first)
                first = {}
                fetched = jax.device_get(interval_metrics)
                seconds = time.time() - interval_start
                tok_s = tokens_per_step * len(fetched) / seconds
                record.update(
                    train_loss=float(np.mean([m["loss"] for m in fetched])),
                    grad_norm=float(np.mean([m["grad_norm"] for m in fetched])),
                    lr=float(schedule(step - 1)), tokens_per_sec=tok_s,
                    mfu=tok_s * flops_token * objective.flops_factor / (peak * jax.device_count()),
                    **{f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in ("accuracy", "margin")
                       if k in fetched[0]})
                eta = (t_cfg.steps - step) * seconds / len(fetched)
                log(f"step {step:>6}/{t_cfg.steps} | loss {record['train_loss']:.4f} | "
                    f"{tok_s:,.0f} tok/s | MFU {100 * record['mfu']:.1f}% | ETA {format_duration(eta)}")
                interval_metrics, interval_start = [], time.time()
            if (t_cfg.eval_every and step % t_cfg.eval_every == 0) or step == t_cfg.steps:
                eval_start = time.time()
                last_val = objective.evaluate(state["params"])
                record.update(last_val)
                log(f"step {step:>6} | {objective.describe(last_val)}")
                interval_start += time.time() - eval_start  # throughput counts training time only
            if record:
                record.update(step=step, elapsed_s=elapsed_before + time.time() - run_start)
                writer.write(record)
            if stop.check(step) or step % t_cfg.ckpt_every == 0 or step == t_cfg.steps:
                ckpt.save(state, data_iter)
            if stop.signal:
                log(f"{stop.signal}: checkpoint saved at step {step}; run the same command to resume")
                break
    return state, step, last_val, stop.signal


def train(cfg: ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last validation metrics."""
    with StartupClock() as startup:
        use_compile_cache(cfg.train.compile_cache)
        return _train(cfg, Workdir(workdir), startup)


def _train(cfg: ConfigDict, wd: Workdir, startup: StartupClock) -> dict:
    cfg, tokenizer = prepare_run(cfg, wd)
    t_cfg, m_cfg = cfg.train, cfg.model

    mesh = make_mesh(cfg.mesh)
    rules = dict(cfg.mesh.rules)
    n_proc, micro = jax.process_count(), t_cfg.batch_size // t_cfg.grad_accum
    batch_ways = batch_shards(rules, dict(mesh.shape))
    if micro % batch_ways or micro % n_proc:
        raise ConfigError(f"micro-batch {micro} (train.batch_size / grad_accum) must be divisible by the "
                          f"{batch_ways} batch shards of the mesh and by {n_proc} processes")

    graphdef, abstract_params, axes = abstract_model(m_cfg)
    tx = make_optimizer(t_cfg)
    lora, base, init_lora = LoraSpec.from_config(t_cfg.lora), None, None
    if lora.enabled:
        init_lora = functools.partial(init_lora_state, abstract_params, lora, ModelConfig.from_config(m_cfg).mlp,
                                      tx, t_cfg.seed)
        abstract_state = jax.eval_shape(init_lora)
        state_sharding = tree_shardings(mesh, rules, abstract_state, adapter_axes(axes, abstract_state["params"]))
        base = lora_base(cfg, with_sharding(abstract_params, tree_shardings(mesh, rules, abstract_params, axes)))
        n_adapters = count_params(abstract_state["params"])
        log(f"LoRA rank {lora.rank} (alpha {lora.alpha:g}): {n_adapters / 1e6:.3f}M adapter parameters train; the "
            f"base is frozen{f' in {lora.base_dtype}' if lora.base_dtype else ''}")
    else:
        abstract_state = jax.eval_shape(functools.partial(init_state, m_cfg, tx, t_cfg.seed))
        state_sharding = tree_shardings(mesh, rules, abstract_state, axes)
    shardings = BatchShardings(
        train=NamedSharding(mesh, logical_to_spec((None, "batch", "length"), rules, mesh.shape)),
        eval=NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh.shape)),
        replicated=NamedSharding(mesh, PartitionSpec()))
    ref_params = None
    if t_cfg.objective == "dpo":
        ref_params = init_params_from(cfg, with_sharding(abstract_params, state_sharding["params"]))
    ctx = RunContext(cfg, tokenizer, graphdef, tx, state_sharding, shardings, ref_params, base)
    objective = (dpo_objective if t_cfg.objective == "dpo" else lm_objective)(ctx)

    n_params = count_params(abstract_params)
    flops_token = flops_per_token(m_cfg, abstract_params)
    peak, peak_source = ((t_cfg.peak_tflops * 1e12, "train.peak_tflops") if t_cfg.peak_tflops
                         else mfu_peak(m_cfg.dtype, peak_cache()))
    log(f"model: {m_cfg.family}, {n_params / 1e6:.2f}M params, {flops_token / 1e6:.1f} MFLOP/token; "
        f"mesh {dict(mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s/device ({peak_source})")

    if (adv := t_cfg.adversarial).method != "none":
        log(f"adversarial training: {adv.method} (eps {adv.eps:g}, alpha {adv.alpha:g}, {adv.steps} step(s), "
            f"{adv.norm}, weight {adv.weight:g}, init {adv.init}, scope {adv.scope})")
    writer = MetricsWriter(wd.metrics_path, wd.tb_dir)
    try:
        with Checkpointer(wd.checkpoint_dir, t_cfg.keep_ckpts) as ckpt, use_rules(mesh, rules):
            state, first_step = restore_or_init(cfg, ckpt, objective, abstract_state, state_sharding, tx,
                                                ref_params, init_lora)
            state, step, last_val, stopped_by = run_steps(cfg, objective, state, first_step, ckpt, writer, wd,
                                                          shardings.train, flops_token, peak, startup)
            if not last_val and not stopped_by:
                last_val = objective.evaluate(state["params"])
                log(f"step {step:>6} | {objective.describe(last_val)} (resumed)")
    finally:
        writer.close()
    if jax.process_index() == 0:
        plot_losses(read_metrics(wd.metrics_path), wd.plot_path, title=f"{m_cfg.family} {n_params / 1e6:.1f}M")
    if jax.process_count() == 1 and t_cfg.samples and not stopped_by:
        params = state["params"] if base is None else attach(base, state["params"], lora)
        write_samples(Sampler(m_cfg, graphdef, params, tokenizer), list(t_cfg.samples), wd.samples_path, t_cfg.seed)
    return {"step": step, "stopped_by": stopped_by or "", **objective.result, **last_val}


def write_samples(sampler: Sampler, prompts: list[str], path: Path, seed: int) -> None:
    """Draws one completion per prompt, prints them and saves them to `path`."""
    texts = sampler.generate(prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=seed)
    shown = "".join(f"--- {p!r}\n{p}{t}\n" for p, t in zip(prompts, texts, strict=True))
    path.write_text(shown)
    log(f"samples (also in {path}):\n{shown}")


def _rewrite_metrics(path: Path, records: list[dict]) -> None:
    """Keeps only `records` in metrics.jsonl (steps after the restored checkpoint are redone)."""
    if jax.process_index() == 0:
        write_jsonl(records, path)
