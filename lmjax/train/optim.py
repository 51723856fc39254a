"""The optimizer: AdamW, or Muon on the hidden matrices with AdamW on the rest; warm-up and decay; global-norm
clipping; no weight decay on norms and biases."""

import jax
import optax
from ml_collections import ConfigDict

from lmjax.parallel.rules import path_names

# Muon's view of each hidden matrix, by parameter name: (reduction axes, output axes) of `x @ W`. Attention's
# [D, H, hd] and [H, hd, D] weights are orthogonalised as the [D, H*hd] and [H*hd, D] matrices they are.
# Counted from the end, so the leading layer axis of scanned blocks (`model.scan_layers`) is a batch axis:
# each layer's matrix is orthogonalised on its own, as in the unrolled layout.
MUON_AXES = {
    "query": ((-3,), (-2, -1)), "key": ((-3,), (-2, -1)), "value": ((-3,), (-2, -1)), "out": ((-3, -2), (-1,)),
    "fc_in": ((-2,), (-1,)), "gate": ((-2,), (-1,)), "up": ((-2,), (-1,)), "fc_out": ((-2,), (-1,)),
    "down": ((-2,), (-1,)),
}


def lr_schedule(train_cfg: ConfigDict) -> optax.Schedule:
    """Linear warm-up from `lr / (warmup_steps + 1)` to `lr`, then cosine / linear decay to `lr * min_lr_ratio`,
    constant, or "wsd": constant until the last `cooldown_fraction` of the steps, then linear to
    `lr * min_lr_ratio`. The schedule lasts `schedule_steps` (`steps` when 0) and holds its last value after."""
    t = train_cfg
    length = t.schedule_steps or t.steps
    warmup = min(t.warmup_steps, length)
    peak, end = t.lr, t.lr * t.min_lr_ratio
    decay_steps = max(length - warmup, 1)
    if t.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.min_lr_ratio)
    elif t.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif t.decay == "wsd":
        cooldown = min(round(t.cooldown_fraction * length), decay_steps)
        decay = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, cooldown)],
                                     [decay_steps - cooldown])
    else:
        decay = optax.constant_schedule(peak)
    # Warm-up as nanoGPT's (step + 1) / (warmup + 1): the first step already moves the weights (from 0 it was lost).
    return optax.join_schedules([optax.linear_schedule(peak / (warmup + 1), peak, warmup), decay], [warmup])


def _name(path) -> str:
    return path_names(path)[-1]


def decay_mask(params):
    """True for weights (decayed), False for norm scales and biases (named `scale`, `*bias`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not (_name(path) == "scale" or _name(path).endswith(
        "bias")), params)


def muon_dimensions(params):
    """Muon's dimension numbers for the blocks' matrices (`MUON_AXES`); None (AdamW) for everything else: the
    embeddings, the output head, norms and biases."""

    def dims(path, _):
        keys = path_names(path)
        if "blocks" not in keys or _name(path) not in MUON_AXES:
            return None
        reduction, output = MUON_AXES[_name(path)]
        return optax.contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)

    return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(train_cfg: ConfigDict) -> optax.GradientTransformation:
    """The optimizer the train step applies: clip (or nothing when grad_clip is 0), then AdamW, or optax's Muon.
    The state has the same structure whatever grad_clip is, so a checkpoint restores either way.

    Muon (Nesterov momentum `muon_momentum`, `muon_ns_steps` Newton-Schulz iterations) updates the blocks'
    matrices with its updates scaled to AdamW's RMS (`consistent_rms=0.2`), so one `lr` serves both groups and
    the AdamW settings carry over; it decays them by `weight_decay`. The AdamW group (embeddings, head, norms,
    biases) takes the same schedule without weight decay: optax's Muon has no mask for that group."""
    t = train_cfg
    schedule = lr_schedule(t)
    if t.optimizer == "muon":
        inner = optax.contrib.muon(schedule, ns_steps=t.muon_ns_steps, beta=t.muon_momentum, eps=t.eps,
                                   weight_decay=t.weight_decay, weight_decay_mask=decay_mask, adam_b1=t.b1,
                                   adam_b2=t.b2, muon_weight_dimension_numbers=muon_dimensions, consistent_rms=0.2)
    else:
        inner = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask)
    clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
    return optax.chain(clip, inner)
