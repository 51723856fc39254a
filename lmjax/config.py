"""Configs: every knob with its default, loading config files, command-line overrides, validation.

A config file is a Python file whose `get_config()` returns `base_config()` with some knobs changed.
Overrides look like `--config.model.num_layers=2`; unknown keys and values of the wrong type fail
with a `ConfigError` that names the key.
"""

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from ml_collections import ConfigDict

FAMILIES = ("gpt2", "llama")
DTYPES = ("float32", "bfloat16", "float16")
MLPS = ("", "gelu", "swiglu", "relu2")
DECAYS = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
MESH_AXES = ("data", "fsdp", "tensor")
REMAT_POLICIES = ("nothing", "dots", "full")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "blockwise")
QUANT_FORMATS = ("", "int8", "int4")
# What train.lora.targets may name: "mlp" (the family's MLP projections) or one projection by lmjax's name.
LORA_TARGETS = ("mlp", "query", "key", "value", "out", "fc_in", "fc_out", "gate", "up", "down")
LORA_BASE_DTYPES = ("", "bfloat16", "int8")
ADVERSARIAL_METHODS = ("none", "neftune", "pgd", "freelb", "smart")


class LmjaxError(Exception):
    """A problem with the user's input (config, data, run directory, checkpoint, request) that lmjax explains
    in one line. The CLI prints these without a traceback; every other exception keeps its traceback."""


class ConfigError(LmjaxError, ValueError):
    """A config file, override or value that cannot be used."""


class DataError(LmjaxError, ValueError):
    """Input data (a source spec, a file, a tokenizer, a JSONL line) that cannot be used."""


def base_config() -> ConfigDict:
    """All knobs with their defaults; config files change some of them."""
    c = ConfigDict()
    c.init_from = ""  # run directory whose parameters and tokenizer start this run (fine-tuning; DPO's reference)
    c.init_from_step = -1  # checkpoint step of init_from to start from; -1 = its latest (recorded at the first start)
    c.init_model = False  # take init_from's model.* but seq_len (llama), dtype, cache_dtype, dropout, remat, attention

    c.model = m = ConfigDict()
    m.family = "llama"  # "gpt2" (learned positions, LayerNorm, GELU, biases) or "llama" (RoPE, RMSNorm, SwiGLU)
    m.vocab_size = 0  # 0 = take it from the tokenizer
    m.vocab_multiple = 128  # embedding rows / output columns are vocab_size rounded up to this; extra logits masked
    m.num_layers = 4  # transformer blocks
    m.num_heads = 4  # query heads
    m.num_kv_heads = 0  # key/value heads for grouped-query attention; 0 = num_heads
    m.head_dim = 0  # per-head width; 0 = d_model // num_heads
    m.d_model = 256  # residual stream width
    m.d_ff = 768  # MLP hidden width
    m.seq_len = 256  # training context length (also the longest prompt + reply when sampling)
    m.dropout = 0.0  # dropout on embeddings, attention output and MLP output
    m.dtype = "bfloat16"  # compute dtype of activations and matmul inputs (float32 accumulation); "auto": per backend
    m.param_dtype = "float32"  # storage dtype of parameters and optimizer state
    m.cache_dtype = ""  # KV cache when decoding: "" (= dtype), float32, bfloat16 or int8 (a scale per token and head)
    m.norm_eps = 1e-5  # epsilon of LayerNorm / RMSNorm
    m.rope_theta = 10000.0  # RoPE base frequency (llama family)
    m.rope_scaling = ""  # RoPE frequency scaling: "" (none) or "llama3" (Llama 3.1+; the rope_* knobs below)
    m.rope_factor = 8.0  # llama3 scaling: low frequencies are divided by this
    m.rope_low_freq_factor = 1.0  # llama3: wavelengths above rope_original_context / this are fully scaled
    m.rope_high_freq_factor = 4.0  # llama3: wavelengths below rope_original_context / this are kept
    m.rope_original_context = 8192  # llama3: the context the frequencies were pretrained for
    m.tie_embeddings = False  # share the input embedding with the output projection
    m.qkv_bias = False  # llama family: biases on the query/key/value projections (Qwen2); gpt2 always has biases
    m.mlp = ""  # MLP kind: "" (the family's: gpt2 gelu, llama swiglu), "gelu", "swiglu" or "relu2" (relu(x)², no gate)
    m.qk_norm = False  # RMS-normalise each head's queries and keys (learned scale) before RoPE and the dot product
    m.zero_init_out = False  # attention-output and MLP-down projections start at zero (each block starts as identity)
    m.logit_softcap = 0.0  # squash the output logits to (-cap, cap) with cap * tanh(logits / cap); 0 = off
    m.remat = "nothing"  # per-block rematerialisation in training: "nothing" (keep all), "dots" (keep matmuls), "full"
    m.attention = "auto"  # auto (per backend and seq_len), xla, cudnn (GPU), splash (TPU) or blockwise (flash)
    m.scan_layers = False  # blocks' params stacked on a "layers" axis and run by one scanned (rematerialised) block

    c.train = t = ConfigDict()
    t.steps = 1000  # optimizer steps in total
    t.schedule_steps = 0  # length of the lr schedule; 0: train.steps, recorded at the first start (extending keeps it)
    t.batch_size = 16  # global batch in sequences per optimizer step (all processes, all micro-batches)
    t.grad_accum = 1  # micro-batches per step; batch_size must be divisible by it
    t.lr = 1e-3  # peak learning rate
    t.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
    t.warmup_steps = 100  # linear warm-up to the peak, from peak / (warmup_steps + 1) at the first step
    t.decay = "cosine"  # after warm-up: "cosine", "linear", "constant" or "wsd" (constant, then linear in the cooldown)
    t.cooldown_fraction = 0.2  # wsd: share of the schedule spent decaying linearly to lr * min_lr_ratio at the end
    t.optimizer = "adamw"  # "adamw", or "muon" (optax's Muon on hidden matrices, AdamW on embeddings, head, norms)
    t.muon_momentum = 0.95  # muon: momentum of the orthogonalised update (Nesterov)
    t.muon_ns_steps = 5  # muon: Newton-Schulz iterations per update (fewer: cheaper, less orthogonal)
    t.weight_decay = 0.1  # AdamW decoupled weight decay (never applied to norms and biases)
    t.b1 = 0.9  # AdamW beta1
    t.b2 = 0.95  # AdamW beta2
    t.eps = 1e-8  # AdamW epsilon
    t.grad_clip = 1.0  # clip gradients to this global norm; 0 = no clipping
    t.log_every = 10  # steps between console / metrics.jsonl lines
    t.eval_every = 200  # steps between validation runs; 0 = only at the end
    t.eval_steps = 10  # validation batches per evaluation
    t.ckpt_every = 200  # steps between checkpoints (one is always written at the end and on SIGTERM)
    t.keep_ckpts = 3  # checkpoints kept on disk
    t.seed = 0  # seeds parameters, dropout and data order
    t.peak_tflops = 0.0  # per-device peak for MFU; 0 = spec sheet bf16 peak of known GPUs/TPUs, else measured once
    t.compile_cache = True  # reuse compiled programs across runs (in $LMJAX_CACHE_DIR/jax-compile); False = off
    t.objective = "lm"  # "lm" (next-token prediction) or "dpo" (preference pairs against the init_from model)
    t.dpo_beta = 0.1  # DPO: strength of the pull towards the reference (init_from) model
    t.dpo_nll = 0.0  # DPO: weight of the chosen reply's mean token NLL added to the loss (RPO); 0 = plain DPO
    t.samples = ("Return the", "This module")  # prompts sampled into samples.txt at the end of training
    t.lora = o = ConfigDict()  # LoRA: train low-rank adapters on the frozen init_from weights (lmjax/model/lora.py)
    o.rank = 0  # adapter rank r; 0 = off (train every parameter)
    o.alpha = 16.0  # the adapters' output is scaled by alpha / rank (as in PEFT)
    o.dropout = 0.0  # dropout on the adapters' input
    o.targets = ("query", "key", "value", "out", "mlp")  # projections to adapt (see LORA_TARGETS); "mlp" = all MLP ones
    o.target_regex = ""  # also adapt the projections whose '/'-joined path matches, e.g. "blocks/[01]/attn/.*"
    o.base_dtype = ""  # frozen base weights held as "" (the run's param_dtype), "bfloat16" or "int8" (per channel)
    t.adversarial = a = ConfigDict()  # perturbations of the input embeddings in training (lmjax/train/adversarial.py)
    a.method = "none"  # none | neftune (noise) | pgd (train on the attack) | freelb (free ascent) | smart (KL term)
    a.eps = 0.1  # radius of the per-token ball, in units of the embeddings' RMS norm (pgd, freelb, smart)
    a.alpha = 0.03  # ascent step in the same units (pgd, freelb, smart); neftune: its noise scale (5 in the paper)
    a.steps = 1  # K: ascent steps per micro-batch (pgd, freelb, smart)
    a.norm = "l2"  # the ball: "l2" (per token) or "linf" (per coordinate)
    a.weight = 1.0  # smart: weight of the KL term; pgd: share of the adversarial loss in (1 - w) clean + w adv
    a.init = "zero"  # where the ascent starts: "zero" or "random" (in the ball); smart always starts at random
    a.scope = "tokens"  # which inputs move: "tokens" (every real token) or "loss_mask" (those whose target counts)

    c.data = d = ConfigDict()
    d.train = "stdlib"  # source spec (lmjax/data/sources.py), a prepared DIR, chat:stdlib | chat:GLOB; DPO: jsonl:GLOB
    d.val = "stdlib:val"  # held-out source spec (DPO: pairs; "" = every 10th pair of data.train)
    d.cda = False  # counterfactual augmentation: texts with gendered words also train swapped (lmjax/corpus/cda.py)
    d.loaders = 0  # independent data shards (a multiple of the process count; fixes the data order); 0 = 1/process

    c.tokenizer = k = ConfigDict()
    k.kind = "bpe"  # SentencePiece model type: bpe | unigram | char
    k.vocab_size = 4096  # vocabulary size when training a bpe/unigram tokenizer (char: one token per character seen)
    k.path = ""  # directory of an existing tokenizer (tokenizer.model or tokenizer.json); "" = train one on data.train

    c.mesh = s = ConfigDict()
    s.data = -1  # data-parallel axis size; -1 = all devices left over
    s.fsdp = 1  # parameter-sharding axis size
    s.tensor = 1  # tensor-parallel axis size
    s.rules = r = ConfigDict()  # logical axis -> comma-separated mesh axes ("" = replicated)
    r.batch = "data,fsdp"
    r.length = ""
    r.embed = "fsdp"
    r.vocab = "tensor"
    r.heads = "tensor"
    r.kv_heads = "tensor"
    r.head_dim = ""
    r.mlp = "tensor"
    r.position = ""
    r.layers = ""  # the leading axis of the blocks' stacked params (model.scan_layers)
    r.lora_rank = ""  # the LoRA adapters' rank axis

    c.compress = q = ConfigDict()  # how `lmjax compress` made this run out of another (it sets these; read at load)
    q.source = ""  # run directory the weights came from; "" = not a compressed run
    q.source_step = -1  # checkpoint step of the source run
    q.quant = ""  # weight format: "" (float), "int8" (per output channel) or "int4" (groups of group_size)
    q.group_size = 0  # contracted rows sharing one scale; 0 = a whole column (per channel)
    q.matmul = "auto"  # how quantized weights multiply: "int8" (integer matmul), "dequant"; "auto" = int8 on CPU
    q.prune = ""  # pruning of the block projections: "", "magnitude" or "wanda"
    q.sparsity = 0.0  # share of those weights set to zero (unless pattern is set)
    q.pattern = ""  # N:M pattern instead of a share, e.g. "2:4" (keep 2 of every 4 inputs per output)
    q.calibration = ""  # data spec whose text gave Wanda's input norms ("" = the source run's data.val)
    q.calibration_batches = 8  # batches of 8 rows of model.seq_len tokens for those norms

    c.distributed = p = ConfigDict()  # how this process joins a multi-process job (not saved with the run)
    p.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS or auto-detect
    p.num_processes = 0  # processes in the job; 0 = auto-detect (SLURM, Open MPI, Cloud TPU), else one
    p.process_id = -1  # this process's index in [0, num_processes); -1 = auto-detect
    p.local_cpu_devices = 0  # CPU devices per process (jax_num_cpu_devices), e.g. for tests; 0 = JAX's default
    p.timeout_s = 300  # seconds to wait for every process to join
    return c


def load_config(path: str | Path) -> ConfigDict:
    """Runs `get_config()` from a config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"lmjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"get_config() in {path} returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


def config_from_json(text: str) -> ConfigDict:
    """Rebuilds a config saved with `cfg.to_json()` on top of the defaults (so new knobs get defaults)."""
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"saved config is not valid JSON: {e}") from e
    cfg = base_config()
    _merge(cfg, saved, prefix="")
    return cfg


def _merge(cfg: ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
        name = prefix + key
        if key not in cfg:
            raise ConfigError(f"unknown config key {name!r}")
        if isinstance(cfg[key], ConfigDict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} is a group, got {value!r}")
            _merge(cfg[key], value, name + ".")
        else:
            cfg[key] = _coerce(name, cfg[key], value)


def _coerce(name: str, current, value):
    """Converts `value` (a string from the command line, or JSON) to the type of the current value."""
    kind = type(current)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        if kind in (tuple, list):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if value else []
            return tuple(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} expects {kind.__name__}, got {value!r}") from None
    return value


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Applies `key.path=value` strings (the part after `--config.`) to a copy of `cfg`."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, value = item.split("=", 1)
        *groups, leaf = path.split(".")
        node = cfg
        walked = []
        for g in groups:
            walked.append(g)
            if g not in node or not isinstance(node[g], ConfigDict):
                raise ConfigError(f"unknown config group {'.'.join(walked)!r}; known: {sorted(node.keys())}")
            node = node[g]
        if leaf not in node or isinstance(node[leaf], ConfigDict):
            raise ConfigError(f"unknown config key {path!r}; known here: {sorted(node.keys())}")
        node[leaf] = _coerce(path, node[leaf], value)
    return cfg


def validate(cfg: ConfigDict) -> ConfigDict:
    """Checks values that would otherwise fail deep inside JAX; returns `cfg` unchanged."""
    _check_keys(cfg, base_config(), "")
    m, t = cfg.model, cfg.train
    _check(m.family in FAMILIES, f"model.family must be one of {FAMILIES}, got {m.family!r}")
    _check(m.dtype in (*DTYPES, "auto"), f"model.dtype must be auto or one of {DTYPES}, got {m.dtype!r}")
    _check(m.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}, got {m.param_dtype!r}")
    _check(m.cache_dtype in ("", *DTYPES, "int8"), f"model.cache_dtype must be '', int8 or one of {DTYPES}, "
           f"got {m.cache_dtype!r}")
    for key in ("num_layers", "num_heads", "d_model", "d_ff", "seq_len"):
        _check(m[key] > 0, f"model.{key} must be positive, got {m[key]}")
    kv = m.num_kv_heads or m.num_heads
    _check(m.num_heads % kv == 0, f"model.num_heads ({m.num_heads}) must be a multiple of num_kv_heads ({kv})")
    _check(m.head_dim > 0 or m.d_model % m.num_heads == 0,
           f"model.d_model ({m.d_model}) must be divisible by num_heads ({m.num_heads}) unless head_dim is set")
    _check(m.vocab_multiple > 0, f"model.vocab_multiple must be positive (1 = no padding), got {m.vocab_multiple}")
    _check(m.rope_scaling in ("", "llama3"), f"model.rope_scaling must be '' or llama3, got {m.rope_scaling!r}")
    _check(m.rope_factor > 0 and m.rope_high_freq_factor > m.rope_low_freq_factor > 0 and m.rope_original_context > 0,
           "model.rope_factor and rope_original_context must be positive, 0 < rope_low_freq_factor < "
           "rope_high_freq_factor")
    _check(m.family != "llama" or (m.head_dim or m.d_model // m.num_heads) % 2 == 0,
           "llama head_dim must be even for RoPE")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.mlp in MLPS, f"model.mlp must be one of {MLPS}, got {m.mlp!r}")
    _check(m.logit_softcap >= 0, f"model.logit_softcap must be >= 0 (0 = off), got {m.logit_softcap}")
    _check(m.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES} (what each block keeps for the "
           f"backward pass), got {m.remat!r}")
    _check(m.attention in ATTENTION_IMPLEMENTATIONS, f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
           f"got {m.attention!r}")
    _check(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    _check(t.schedule_steps >= 0, f"train.schedule_steps must be >= 0, got {t.schedule_steps}")
    _check(t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
           f"train.batch_size ({t.batch_size}) must be a positive multiple of train.grad_accum ({t.grad_accum})")
    _check(t.decay in DECAYS, f"train.decay must be one of {DECAYS}, got {t.decay!r}")
    _check(0.0 <= t.cooldown_fraction <= 1.0, f"train.cooldown_fraction must be in [0, 1], got {t.cooldown_fraction}")
    _check(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    _check(0.0 <= t.muon_momentum < 1.0, f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}")
    _check(t.muon_ns_steps >= 1, f"train.muon_ns_steps must be at least 1, got {t.muon_ns_steps}")
    _check(t.objective in ("lm", "dpo"), f"train.objective must be lm|dpo, got {t.objective!r}")
    _check(t.dpo_beta > 0, f"train.dpo_beta must be positive, got {t.dpo_beta}")
    _check(t.dpo_nll >= 0, f"train.dpo_nll must be >= 0, got {t.dpo_nll}")
    _check(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    _validate_lora(cfg)
    _validate_adversarial(cfg)
    _check(cfg.data.loaders >= 0, f"data.loaders must be >= 0 (0 = one per process), got {cfg.data.loaders}")
    _check(t.log_every > 0 and t.ckpt_every > 0 and t.eval_steps > 0,
           "train.log_every, train.ckpt_every and train.eval_steps must be positive")
    _check(cfg.tokenizer.kind in ("bpe", "unigram", "char"),
           f"tokenizer.kind must be bpe|unigram|char, got {cfg.tokenizer.kind!r}")
    q = cfg.compress
    _check(q.quant in QUANT_FORMATS, f"compress.quant must be one of {QUANT_FORMATS}, got {q.quant!r}")
    _check(q.matmul in ("auto", "int8", "dequant"), f"compress.matmul must be auto|int8|dequant, got {q.matmul!r}")
    _check(q.prune in ("", "magnitude", "wanda"), f"compress.prune must be ''|magnitude|wanda, got {q.prune!r}")
    _check(q.group_size >= 0 and 0.0 <= q.sparsity < 1.0 and q.calibration_batches > 0,
           "compress.group_size must be >= 0, compress.sparsity in [0, 1), compress.calibration_batches positive")
    for axis in MESH_AXES:
        size = cfg.mesh[axis]
        _check(size == -1 or size > 0, f"mesh.{axis} must be positive or -1, got {size}")
    _check(sum(cfg.mesh[a] == -1 for a in MESH_AXES) <= 1, "at most one mesh axis may be -1")
    for logical, axes in cfg.mesh.rules.items():
        for axis in filter(None, axes.split(",")):
            _check(axis in MESH_AXES, f"mesh.rules.{logical} names unknown mesh axis {axis!r}")
    return cfg


# Groups whose keys are the user's to choose: the logical axis names that sharding rules map to mesh axes.
OPEN_GROUPS = ("mesh.rules",)


def _check_keys(cfg: ConfigDict, base: ConfigDict, prefix: str) -> None:
    """Refuses a missing group and an unknown key at any depth (a misspelt knob would otherwise be ignored)."""
    where = f"config group {prefix[:-1]!r}" if prefix else "config"
    extra = set(cfg.keys()) - set(base.keys())
    _check(not extra, f"unknown keys in {where}: {sorted(extra)}")
    for key, value in base.items():
        _check(key in cfg, f"{where} has no {key!r}")
        if isinstance(value, ConfigDict) and prefix + key not in OPEN_GROUPS:
            _check(isinstance(cfg[key], ConfigDict), f"{prefix}{key} must be a group of knobs, got {cfg[key]!r}")
            _check_keys(cfg[key], value, f"{prefix}{key}.")


def _validate_adversarial(cfg: ConfigDict) -> None:
    a = cfg.train.adversarial
    _check(a.method in ADVERSARIAL_METHODS, f"train.adversarial.method must be one of {ADVERSARIAL_METHODS}, "
                                            f"got {a.method!r}")
    _check(a.norm in ("l2", "linf"), f"train.adversarial.norm must be l2|linf, got {a.norm!r}")
    _check(a.init in ("zero", "random"), f"train.adversarial.init must be zero|random, got {a.init!r}")
    _check(a.scope in ("tokens", "loss_mask"), f"train.adversarial.scope must be tokens|loss_mask, got {a.scope!r}")
    _check(a.eps > 0 and a.alpha > 0, f"train.adversarial.eps and alpha must be positive, got {a.eps}, {a.alpha}")
    _check(a.steps >= 1, f"train.adversarial.steps must be >= 1, got {a.steps}")
    _check(a.weight >= 0 and (a.method != "pgd" or a.weight <= 1),
           f"train.adversarial.weight must be >= 0 (pgd: in [0, 1]), got {a.weight}")
    _check(cfg.train.objective != "dpo" or a.method in ("none", "neftune", "smart"),
           f"train.adversarial.method={a.method} is for next-token training; DPO supports neftune and smart")


def _validate_lora(cfg: ConfigDict) -> None:
    o = cfg.train.lora
    _check(o.rank >= 0, f"train.lora.rank must be >= 0 (0 = off), got {o.rank}")
    _check(o.alpha > 0, f"train.lora.alpha must be positive, got {o.alpha}")
    _check(0.0 <= o.dropout < 1.0, f"train.lora.dropout must be in [0, 1), got {o.dropout}")
    unknown = [n for n in o.targets if n not in LORA_TARGETS]
    _check(not unknown, f"train.lora.targets: unknown {unknown}; known: {', '.join(LORA_TARGETS)}")
    _check(o.base_dtype in LORA_BASE_DTYPES, f"train.lora.base_dtype must be one of {LORA_BASE_DTYPES}, "
           f"got {o.base_dtype!r}")
    try:
        re.compile(o.target_regex)
    except re.error as e:
        raise ConfigError(f"train.lora.target_regex {o.target_regex!r} is not a regular expression: {e}") from None
    _check(o.rank == 0 or cfg.train.objective == "lm", "train.lora supports train.objective=lm only (not DPO yet)")
    _check(o.rank == 0 or cfg.train.optimizer == "adamw", "train.lora trains its adapters with "
           "train.optimizer=adamw (Muon orthogonalises whole weight matrices, not low-rank factors)")
    _check(o.rank == 0 or not cfg.model.scan_layers, "train.lora needs model.scan_layers=False (adapters are per-layer "
           "weights); the init_from run may be scanned: its parameters are unrolled when loaded")


def config_diff(old: ConfigDict, new: ConfigDict) -> dict[str, tuple]:
    """{"group.key": (old value, new value)} for every knob whose value differs between two configs."""
    flat_old, flat_new = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {k: (flat_old.get(k), flat_new.get(k)) for k in sorted(flat_old.keys() | flat_new.keys())
            if flat_old.get(k) != flat_new.get(k)}


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = tuple(value) if isinstance(value, list) else value
    return flat


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
