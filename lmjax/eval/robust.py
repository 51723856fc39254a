"""Robustness evaluation (`lmjax eval robust`): how a run's model holds up when its inputs move.

Three parts, each optional:

- lm: the held-out loss (nats per counted token) on the run's own validation batches (`data.val` packed as
  training validates: `eval_batches`; a chat run's held-out conversations with the assistant-only loss mask),
  clean, then for each radius eps under a random perturbation on the eps-sphere and under a K-step PGD attack
  in the eps-ball of the input embeddings (Madry et al. 2018: random start in the ball, steps of 2.5 eps / K,
  the last point scored). Balls are per token and relative to r, the RMS row norm of the embedding table
  (lmjax/model/perturb.py): eps = 0.1 lets every token's embedding move by a tenth of a typical embedding's
  length. Every real token may move (prompt included); the loss counts what training counts. The gap between
  PGD and random at the same eps is what an adversary gains over noise.
- chat: ROUGE-L F1 (stemmed, as `lmjax eval chat`) of greedy replies to held-out questions, clean and with the
  question (every user turn) perturbed by lmjax/text/noise.py at each strength, with the relative drop and a
  paired bootstrap interval of the drop (the same questions resampled for both).
- redteam: the attack success rate of lmjax/eval/redteam.py (the mean over its attack categories of the share
  of harmful replies that got through, content filter on as served), with each category's share.

The chat and red-team parts run for chat runs (chat or preference data) and are skipped with a note otherwise,
unless asked for.
"""

import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rouge_score import rouge_scorer

from lmjax.config import ConfigError, DataError
from lmjax.eval.chat_qa import answer, fits, qa_pairs
from lmjax.eval.metrics import bootstrap_indices
from lmjax.eval.redteam import red_team
from lmjax.infer.sampler import Sampler
from lmjax.input.packing import eval_batches
from lmjax.input.specs import open_chunks, parse_spec, read_chat
from lmjax.model.loss import Batch, loss_weights, token_losses
from lmjax.model.params import Params
from lmjax.model.perturb import NORMS, embedding_rms, pgd_attack, random_on_sphere, random_start
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir
from lmjax.text.blocklist import Blocklist
from lmjax.text.noise import STRENGTHS, perturb

EPS = (0.05, 0.1, 0.2)
PGD_STEP = 2.5  # PGD's step is PGD_STEP * eps / steps
REPLY_TOKENS = 48  # greedy reply length, as `lmjax eval chat`


def clean_sums(params: Params, batch: Batch, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """The loss sum of one batch without perturbation and its counted tokens."""
    weights = loss_weights(batch)
    return {"loss_sum": (token_losses(params, graphdef, batch) * weights).sum(), "tokens": weights.sum()}


def perturbed_sums(params: Params, batch: Batch, rng: jax.Array, eps: jax.Array, *, graphdef: nnx.GraphDef,
                   dim: int, norm: str, steps: int) -> dict[str, jax.Array]:
    """Loss sums of one batch under a random perturbation on the sphere of radius eps * r and under a `steps`-step
    PGD attack in that ball (the module docstring)."""
    weights = loss_weights(batch)
    mask = batch["segment_ids"] != 0
    radius = eps * embedding_rms(params)
    shape = (*batch["inputs"].shape, dim)

    def loss_sum(delta: jax.Array) -> jax.Array:
        return (token_losses(params, graphdef, batch, embed_delta=delta) * weights).sum()

    noise_rng, start_rng = jax.random.split(rng)
    noise = random_on_sphere(noise_rng, shape, radius, norm, mask)
    start = random_start(start_rng, shape, radius, mask)
    attack = pgd_attack(loss_sum, start, radius, PGD_STEP * radius / steps, norm, mask, steps)
    return {"random": loss_sum(noise), "pgd": loss_sum(attack)}


# Jitted once per process: runs of one architecture share the compiled steps (the graphdef is a static argument).
_clean_sums = jax.jit(clean_sums, static_argnames=("graphdef",))
_perturbed_sums = jax.jit(perturbed_sums, static_argnames=("graphdef", "dim", "norm", "steps"))


def lm_robustness(params: Params, graphdef: nnx.GraphDef, batches: Sequence[Batch], dim: int,
                  eps: Sequence[float] = EPS, steps: int = 5, norm: str = "l2", seed: int = 0) -> dict:
    """Held-out loss of `batches` clean, under random and under PGD perturbations at each of `eps` (relative to
    the embedding RMS norm), with the increases over clean; one compiled step serves every eps."""
    if norm not in NORMS:
        raise ConfigError(f"norm {norm!r}: use one of {', '.join(NORMS)}")
    if steps < 1 or any(e < 0 for e in eps):
        raise ConfigError("attack steps must be >= 1 and every eps >= 0")
    clean = jax.device_get([_clean_sums(params, b, graphdef=graphdef) for b in batches])
    tokens = math.fsum(float(c["tokens"]) for c in clean)
    clean_loss = math.fsum(float(c["loss_sum"]) for c in clean) / max(tokens, 1)
    step = functools.partial(_perturbed_sums, graphdef=graphdef, dim=dim, norm=norm, steps=steps)
    rows = []
    keys = [jax.random.fold_in(jax.random.PRNGKey(seed), j) for j in range(len(batches))]
    for e in eps:  # the same random directions and starts at every eps: the rows differ only in the radius
        sums = jax.device_get([step(params, b, key, jnp.float32(e)) for b, key in zip(batches, keys, strict=True)])
        random_loss = math.fsum(float(s["random"]) for s in sums) / max(tokens, 1)
        pgd_loss = math.fsum(float(s["pgd"]) for s in sums) / max(tokens, 1)
        rows.append({"eps": float(e), "random_loss": random_loss, "pgd_loss": pgd_loss,
                     "random_increase": random_loss - clean_loss, "pgd_increase": pgd_loss - clean_loss})
    return {"clean_loss": clean_loss, "tokens": int(tokens), "batches": len(batches), "norm": norm,
            "attack_steps": steps, "embedding_rms": float(embedding_rms(params)), "eps": rows}


def perturb_prompt(prompt: Sequence[dict], strength: float, seed: int) -> list[dict]:
    """A conversation with every user turn perturbed (lmjax/text/noise.py); system and assistant turns kept."""
    return [{**m, "content": perturb(m["content"], strength, seed)} if m["role"] == "user" else dict(m)
            for m in prompt]


def _interval(samples: np.ndarray, confidence: float = 0.95) -> list[float]:
    tail = 100 * (1 - confidence) / 2
    return [float(x) for x in np.percentile(samples, [tail, 100 - tail])]


def chat_robustness(sampler: Sampler, pairs: Sequence[tuple[list[dict], str]], strengths: Sequence[float],
                    seed: int = 0, examples: int = 3) -> dict:
    """ROUGE-L F1 of greedy replies to `pairs` (prompt messages, reference) clean and with perturbed prompts at
    each strength: mean, drop from clean (absolute, relative, paired 95% bootstrap interval of the absolute drop),
    and the share of prompts the noise changed; the first `examples` questions the highest strength changed."""
    prompts = [list(p) for p, _ in pairs]
    noisy = {s: [perturb_prompt(p, s, seed) for p in prompts] for s in strengths}
    replies = answer(sampler, prompts + [p for s in strengths for p in noisy[s]], REPLY_TOKENS)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    references = [r for _, r in pairs]
    n = len(pairs)

    def rouge(batch: Sequence[str]) -> np.ndarray:
        return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(batch, references, strict=True)])

    clean = rouge(replies[:n])
    index = bootstrap_indices(n, 1000, seed)
    rows, by_strength = [], {}
    for k, s in enumerate(strengths):
        by_strength[s] = replies[n * (k + 1): n * (k + 2)]
        scores = rouge(by_strength[s])
        drop = float(clean.mean() - scores.mean())
        rows.append({"strength": float(s), "rouge_l": float(scores.mean()), "drop": drop,
                     "relative_drop": drop / float(clean.mean()) if clean.mean() > 0 else None,
                     "drop_interval": _interval(clean[index].mean(1) - scores[index].mean(1)),
                     "changed": sum(a != b for a, b in zip(prompts, noisy[s], strict=True)) / n})
    top = max(strengths, default=None)
    changed = [] if top is None else [i for i in range(n) if noisy[top][i] != prompts[i]]
    shown = [{"question": prompts[i][-1]["content"], "perturbed": noisy[top][i][-1]["content"], "reply": replies[i],
              "perturbed_reply": by_strength[top][i], "reference": references[i]} for i in changed[:examples]]
    return {"questions": n, "rouge_l": float(clean.mean()), "rouge_l_interval": _interval(clean[index].mean(1)),
            "strengths": rows, "examples": shown}


def redteam_success(sampler: Sampler) -> dict:
    """`red_team` with the default blocklist, content filter on: attack_success_rate (the mean over attack
    categories of harmful_through), each category's harmful_through, and the benign set's false positives."""
    results = red_team(sampler, Blocklist.default())
    attacks = {c: r["harmful_through"] for c, r in results.items()
               if c != "benign" and isinstance(r, dict) and "harmful_through" in r}
    return {"attack_success_rate": sum(attacks.values()) / max(len(attacks), 1), "categories": attacks,
            "false_positives": results["benign"]["false_positives"]}


def is_chat_run(cfg) -> bool:
    """Whether a run trained a chat model: chat data, preference pairs or the DPO objective."""
    return cfg.train.objective == "dpo" or parse_spec(cfg.data.train).kind in ("chat", "pairs")


def select_questions(sampler: Sampler, pairs: Sequence[tuple[list[dict], str]], strengths: Sequence[float],
                     seed: int, limit: int) -> list[tuple[list[dict], str]]:
    """The first `limit` pairs whose prompt leaves room for a reply clean and at every strength."""
    chosen = []
    for prompt, reference in pairs:
        if len(chosen) == limit:
            break
        if all(fits(sampler, perturb_prompt(prompt, s, seed)) for s in (0.0, *strengths)):
            chosen.append((prompt, reference))
    return chosen


def evaluate_robust(workdir: str, step: int | None = None, eps: Sequence[float] = EPS,
                    strengths: Sequence[float] = tuple(STRENGTHS.values()), attack_steps: int = 5,
                    norm: str = "l2", batches: int = 1, batch_size: int | None = None, questions: int = 32,
                    chat: bool | None = None, redteam: bool = True, source: str | None = None,
                    chat_source: str | None = None, seed: int = 0) -> dict:
    """`lmjax eval robust` (the module docstring). `eps=()` skips the lm part; `batches` of `batch_size` rows
    (default: the run's validation micro-batch) of `source` (default: the run's data.val) are scored. `chat`
    (default: whether the run is a chat run) runs the chat part on the first `questions` held-out questions
    (0 skips it) of `chat_source` (default: data.val's conversations for a chat:... spec, else stdlib:heldout)
    and, with `redteam`, the red-team part. Returns {"workdir", "step", "lm", "chat", "redteam", "notes",
    "summary" (flat figures), "seconds" (per part)}; a skipped part is None with a note saying why."""
    if any(not 0.0 <= s <= 1.0 for s in strengths):
        raise ConfigError(f"strengths must be in [0, 1], got {list(strengths)}")
    if batches < 1 or questions < 0 or (batch_size is not None and batch_size < 1):
        raise ConfigError("--batches and --batch-size must be positive and --questions >= 0")
    start = time.time()
    cfg, graphdef, params, tokenizer, step = restore_model(open_workdir(workdir), step)
    result: dict = {"workdir": str(workdir), "step": step, "lm": None, "chat": None, "redteam": None, "notes": [],
                    "seconds": {}}
    source = source or cfg.data.val
    if eps and parse_spec(source).kind == "pairs":
        result["notes"].append(f"lm: skipped, {source!r} holds preference pairs (pass a documents or chat source)")
    elif eps:
        t = time.time()
        rows = batch_size or max(cfg.train.batch_size // cfg.train.grad_accum, 1)
        chunks = open_chunks(source, tokenizer, cfg.model.seq_len, log=lambda _: None)
        held_out = eval_batches(chunks, cfg.model.seq_len, rows, batches)
        result["lm"] = {"source": source, **lm_robustness(params, graphdef, held_out, cfg.model.d_model, eps,
                                                          attack_steps, norm, seed)}
        result["seconds"]["lm"] = time.time() - t
    chat = is_chat_run(cfg) if chat is None else chat
    if not chat:
        result["notes"].append("chat, redteam: skipped, not a chat run (pass chat=True / --chat to run them)")
    else:
        sampler = Sampler(cfg.model, graphdef, params, tokenizer)
        if questions:
            t = time.time()
            val = parse_spec(cfg.data.val) if cfg.data.val else None
            chat_source = chat_source or (val.source if val and val.kind == "chat" else "stdlib:heldout")
            pairs = select_questions(sampler, qa_pairs(read_chat(chat_source)), strengths, seed, questions)
            if not pairs:
                raise DataError(f"no question of chat source {chat_source!r} fits the model's context")
            result["chat"] = {"source": chat_source, **chat_robustness(sampler, pairs, strengths, seed)}
            result["seconds"]["chat"] = time.time() - t
        if redteam:
            t = time.time()
            result["redteam"] = redteam_success(sampler)
            result["seconds"]["redteam"] = time.time() - t
    result["summary"] = summary(result)
    result["seconds"]["total"] = time.time() - start
    return result


def summary(result: dict) -> dict[str, float]:
    """The headline figures of an `evaluate_robust` result as one flat dict (for tables of many runs):
    clean_loss, random_loss@EPS, pgd_loss@EPS, rouge_l, rouge_l@S, rouge_l_relative_drop@S,
    attack_success_rate, for the parts that ran."""
    out = {}
    if result["lm"]:
        out["clean_loss"] = result["lm"]["clean_loss"]
        for row in result["lm"]["eps"]:
            out[f"random_loss@{row['eps']:g}"] = row["random_loss"]
            out[f"pgd_loss@{row['eps']:g}"] = row["pgd_loss"]
    if result["chat"]:
        out["rouge_l"] = result["chat"]["rouge_l"]
        for row in result["chat"]["strengths"]:
            out[f"rouge_l@{row['strength']:g}"] = row["rouge_l"]
            out[f"rouge_l_relative_drop@{row['strength']:g}"] = row["relative_drop"]
    if result["redteam"]:
        out["attack_success_rate"] = result["redteam"]["attack_success_rate"]
    return out


def format_robust(result: dict) -> str:
    """Readable tables of an `evaluate_robust` result."""
    lines = [f"{result['workdir']} (step {result['step']})"]
    lm = result["lm"]
    if lm:
        lines += [f"\nheld-out loss on {lm['source']}: {lm['tokens']:,} tokens in {lm['batches']} batches; "
                  f"{lm['norm']} balls of radius eps x embedding RMS norm ({lm['embedding_rms']:.3f}), "
                  f"PGD {lm['attack_steps']} steps",
                  f"{'eps':>6} {'random loss':>12} {'(+)':>8} {'PGD loss':>10} {'(+)':>8}",
                  f"{'0':>6} {lm['clean_loss']:12.4f} {'':>8} {lm['clean_loss']:10.4f}"]
        lines += [f"{r['eps']:6g} {r['random_loss']:12.4f} {r['random_increase']:+8.4f} {r['pgd_loss']:10.4f} "
                  f"{r['pgd_increase']:+8.4f}" for r in lm["eps"]]
    chat = result["chat"]
    if chat:
        lo, hi = chat["rouge_l_interval"]
        lines += [f"\nchat ROUGE-L F1 on {chat['questions']} questions of {chat['source']}, prompts perturbed "
                  "(typos, word swaps/deletions, case, whitespace, synonyms)",
                  f"{'strength':>8} {'changed':>8} {'ROUGE-L':>8} {'drop':>8} {'relative':>8}  95% interval of drop",
                  f"{'clean':>8} {0:8.0%} {chat['rouge_l']:8.4f} {'':>8} {'':>8}  (ROUGE-L [{lo:.3f}, {hi:.3f}])"]
        for r in chat["strengths"]:
            relative = "n/a" if r["relative_drop"] is None else f"{r['relative_drop']:.1%}"
            lines.append(f"{r['strength']:8g} {r['changed']:8.0%} {r['rouge_l']:8.4f} {r['drop']:+8.4f} "
                         f"{relative:>8}  [{r['drop_interval'][0]:+.3f}, {r['drop_interval'][1]:+.3f}]")
        for e in chat["examples"][:1]:
            lines += [f"  e.g. {e['question']!r} -> {e['perturbed']!r}",
                      f"       reply {e['reply']!r} -> {e['perturbed_reply']!r}"]
    red = result["redteam"]
    if red:
        per = ", ".join(f"{c} {v:.0%}" for c, v in red["categories"].items())
        lines += [f"\nred-team attack success rate {red['attack_success_rate']:.1%} (content filter on; {per}); "
                  f"benign false positives {red['false_positives']:.0%}"]
    lines += [f"note: {n}" for n in result["notes"]]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    return "\n".join(lines)
