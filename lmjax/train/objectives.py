"""What `train` optimises (`train.objective`): its data, jitted step and evaluation.

`lm_objective` is next-token prediction on documents or conversations; `dpo_objective` is DPO on
preference pairs against the frozen `init_from` run. Each returns an `Objective` that the training loop
(lmjax/train/loop.py) drives without knowing which one it is.
"""

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from lmjax.eval.baselines import unigram_bpb_from_counts
from lmjax.eval.lm import eval_step, jit_eval_step, lm_metrics
from lmjax.input.loaders import Loaders
from lmjax.input.packing import eval_batches, train_iterator
from lmjax.input.pairs import eval_pair_batches, pair_batches
from lmjax.input.specs import open_chunks, open_pairs
from lmjax.model.lora import LoraSpec, attach
from lmjax.text.tokenizer import Tokenizer
from lmjax.train.adversarial import AdversarialSpec
from lmjax.train.dpo import dpo_eval_step, dpo_step, evaluate_pairs
from lmjax.train.metrics import log
from lmjax.train.step import lora_train_step, train_step


class BatchShardings(NamedTuple):
    """Layouts of train batches ([grad_accum, batch, length]), eval batches ([batch, length]) and scalars."""
    train: NamedSharding
    eval: NamedSharding
    replicated: NamedSharding


class RunContext(NamedTuple):
    """What an objective is built from."""
    cfg: ConfigDict
    tokenizer: Tokenizer
    graphdef: object  # nnx.GraphDef of the model
    tx: object  # optax.GradientTransformation
    state_sharding: dict  # shardings of the train state
    shardings: BatchShardings
    ref_params: dict | None  # DPO: the frozen reference (the init_from parameters), laid out like the params
    base: dict | None  # LoRA: the frozen base weights the adapters (the state's params) attach to


class Objective(NamedTuple):
    """What `train` optimises: its data, jitted step and evaluation (`train.objective`)."""
    data_iter: Loaders  # this process's rows of each global train batch, checkpointable
    step_fn: Callable  # (state, global batch) -> (state, metrics with loss and grad_norm)
    evaluate: Callable  # params -> validation metrics
    describe: Callable  # validation metrics -> one log line
    rows_per_example: int  # sequences per batch example, for tokens/s
    result: dict  # extra entries of train()'s result
    flops_factor: float = 1.0  # model FLOPs per trained token over training's 6N-and-attention (DPO: + reference)


def lm_objective(ctx: RunContext) -> Objective:
    """Next-token prediction on documents or conversations; validation loss, perplexity and bits per byte."""
    cfg, tokenizer, graphdef, tx, state_sharding, shardings, _, base = ctx
    t_cfg, seq_len = cfg.train, cfg.model.seq_len
    n_proc, micro = jax.process_count(), t_cfg.batch_size // t_cfg.grad_accum
    start = time.time()
    train_chunks = open_chunks(cfg.data.train, tokenizer, seq_len, cda=cfg.data.cda, log=log)
    val_chunks = open_chunks(cfg.data.val, tokenizer, seq_len, log=log)
    n_train_tokens = train_chunks.tokens
    log(f"data: {n_train_tokens:,} train tokens ({len(train_chunks):,} chunks), {val_chunks.tokens:,} val tokens "
        f"in token shards, opened in {time.time() - start:.1f}s")
    baseline_bpb = unigram_bpb_from_counts(train_chunks.unigram, val_chunks.unigram, tokenizer.token_bytes())
    log(f"unigram baseline: val bpb {baseline_bpb:.3f}")
    fingerprint = {"data": cfg.data.train, "chunks": len(train_chunks), "tokens": n_train_tokens,
                   "tokenizer": tokenizer.fingerprint}
    data_iter = make_loaders(cfg, fingerprint, lambda k, count, rows: train_iterator(train_chunks, seq_len, rows,
                                                                                     t_cfg.seed, k, count))
    val_data = eval_batches(val_chunks, seq_len, micro // n_proc, t_cfg.eval_steps, jax.process_index(), n_proc)
    token_bytes = jax.device_put(jnp.asarray(tokenizer.token_bytes(), jnp.float32), shardings.replicated)
    dropout = cfg.model.dropout > 0
    adversarial = AdversarialSpec.from_config(t_cfg.adversarial)
    if base is None:
        step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=dropout,
                                            adversarial=adversarial),
                          in_shardings=(state_sharding, shardings.train),
                          out_shardings=(state_sharding, shardings.replicated), donate_argnums=0)
        eval_fn = jit_eval_step(graphdef, (state_sharding["params"], shardings.eval, shardings.replicated))
    else:  # the base keeps the layout it was loaded with (None: taken from the arrays)
        lora = LoraSpec.from_config(t_cfg.lora)
        lora_step = jax.jit(functools.partial(lora_train_step, graphdef=graphdef, tx=tx, dropout=dropout, lora=lora,
                                              adversarial=adversarial),
                            in_shardings=(state_sharding, None, shardings.train),
                            out_shardings=(state_sharding, shardings.replicated), donate_argnums=0)
        lora_eval = jax.jit(lambda adapters, frozen, b, t: eval_step(attach(frozen, adapters, lora), b, t,
                                                                     graphdef=graphdef),
                            in_shardings=(state_sharding["params"], None, shardings.eval, shardings.replicated))
        step_fn = lambda state, batch: lora_step(state, base, batch)
        eval_fn = lambda adapters, b, t: lora_eval(adapters, base, b, t)

    def evaluate(params) -> dict:
        return lm_metrics(eval_fn, params, (global_batch(b, shardings.eval) for b in val_data), token_bytes)

    def describe(v: dict) -> str:
        return (f"val loss {v['val_loss']:.4f} | ppl {v['val_ppl']:.2f} | bpb {v['val_bpb']:.3f} "
                f"(unigram {baseline_bpb:.3f})")

    return Objective(data_iter, step_fn, evaluate, describe, 1, {"unigram_bpb": baseline_bpb})


def dpo_objective(ctx: RunContext) -> Objective:
    """DPO (lmjax/train/dpo.py) on the preference pairs of data.train against the frozen `init_from`
    parameters; held out: the pairs of data.val, or those of 10% of data.train's prompts if data.val is ""."""
    cfg, tokenizer, graphdef, tx, state_sharding, shardings, ref_params, _ = ctx
    t_cfg, seq_len = cfg.train, cfg.model.seq_len
    n_proc, micro = jax.process_count(), t_cfg.batch_size // t_cfg.grad_accum
    if cfg.data.val:
        train_pairs = open_pairs(cfg.data.train, tokenizer, seq_len, log=log)
        val_pairs = open_pairs(cfg.data.val, tokenizer, seq_len, log=log)
    else:
        train_pairs = open_pairs(cfg.data.train, tokenizer, seq_len, "train", log=log)
        val_pairs = open_pairs(cfg.data.train, tokenizer, seq_len, "heldout", log=log)
    log(f"data: {len(train_pairs):,} train and {len(val_pairs):,} held-out preference pairs kept; "
        f"{train_pairs.dropped:,} and {val_pairs.dropped:,} dropped for a side longer than seq_len + 1 = "
        f"{seq_len + 1} tokens")
    fingerprint = {"data": cfg.data.train, "pairs": len(train_pairs), "tokenizer": tokenizer.fingerprint}
    data_iter = make_loaders(cfg, fingerprint, lambda k, count, rows: pair_batches(train_pairs, seq_len, rows,
                                                                                   t_cfg.seed, k, count))
    val_data = [global_batch(b, shardings.eval) for b in eval_pair_batches(
        val_pairs, seq_len, micro // n_proc, t_cfg.eval_steps, jax.process_index(), n_proc)]
    params_sharding = state_sharding["params"]
    step = jax.jit(functools.partial(dpo_step, graphdef=graphdef, tx=tx, beta=t_cfg.dpo_beta,
                                     nll=t_cfg.dpo_nll, adversarial=AdversarialSpec.from_config(t_cfg.adversarial)),
                   in_shardings=(state_sharding, params_sharding, shardings.train),
                   out_shardings=(state_sharding, shardings.replicated), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(dpo_eval_step, graphdef=graphdef, beta=t_cfg.dpo_beta,
                                        nll=t_cfg.dpo_nll),
                      in_shardings=(params_sharding, params_sharding, shardings.eval))

    def describe(v: dict) -> str:
        return (f"val DPO loss {v['val_loss']:.4f} | preference accuracy {v['val_accuracy']:.3f} | "
                f"log-ratio margin {v['val_margin']:.3f}")

    return Objective(data_iter, lambda state, batch: step(state, ref_params, batch),
                     lambda params: evaluate_pairs(eval_fn, params, ref_params, val_data), describe, 2, {},
                     flops_factor=4 / 3)  # each step also runs the frozen reference forward: 2 of training's 6


def make_loaders(cfg: ConfigDict, fingerprint: dict, make) -> Loaders:
    """This process's share of the `data.loaders` train loaders built by `make(index, count, rows)`."""
    return Loaders(make, cfg.data.loaders, cfg.train.batch_size, cfg.train.grad_accum, jax.process_index(),
                   jax.process_count(), fingerprint)


def with_sharding(abstract, shardings):
    """`abstract` shapes with `shardings` attached (what Orbax restores into)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
