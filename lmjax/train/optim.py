"""AdamW with warm-up and decay, global-norm clipping, no weight decay on norms and biases."""

import jax
import optax
from ml_collections import ConfigDict


def lr_schedule(train_cfg: ConfigDict) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine / linear decay to `lr * min_lr_ratio` (or constant)."""
    t = train_cfg
    warmup = min(t.warmup_steps, t.steps)
    peak, end = t.lr, t.lr * t.min_lr_ratio
    decay_steps = max(t.steps - warmup, 1)
    if t.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.min_lr_ratio)
    elif t.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """True for weights (decayed), False for norm scales and biases (named `scale`, `*bias`)."""

    def decayed(path, _) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name == "scale" or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(train_cfg: ConfigDict) -> optax.GradientTransformation:
    """The optimizer the train step applies: clip (or nothing when grad_clip is 0), then AdamW. The state
    has the same structure either way, so a checkpoint restores whatever grad_clip is."""
    t = train_cfg
    adamw = optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask)
    clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
