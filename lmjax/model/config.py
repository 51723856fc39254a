"""The model's typed, immutable config: the `model.*` knobs with defaults resolved.

Model code reads a `ModelConfig`; the public entry points (`abstract_model`, `init_params`, `init_cache`,
`matmul_params`, `flops_per_token`) also accept the `cfg.model` ConfigDict and convert it once at the top.
Being a frozen dataclass of plain values, a ModelConfig is hashable and can be a static jit argument.
"""

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

# Logical axes that tensor parallelism splits, with the knob that sizes each. A mesh axis that a sharding
# rule assigns to one of them but that does not divide it is an error (the blocks' work would be repeated
# on every device of that axis instead of split), not a logged fallback to replication.
TENSOR_PARALLEL_AXES = {
    "heads": "model.num_heads",
    "kv_heads": "the key/value heads (model.num_kv_heads)",
    "mlp": "model.d_ff",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """What `model.family` fixes about the architecture (the other knobs say the rest)."""

    layer_norm: bool  # LayerNorm with a bias (gpt2), else RMSNorm
    learned_positions: bool  # a learned [seq_len, d_model] table added to the embeddings (gpt2), else RoPE
    attention_bias: bool  # biases on all four attention projections (gpt2)
    mlp: str  # the MLP that `model.mlp=""` means


FAMILY = {"gpt2": Family(layer_norm=True, learned_positions=True, attention_bias=True, mlp="gelu"),
          "llama": Family(layer_norm=False, learned_positions=False, attention_bias=False, mlp="swiglu")}
MLP_WEIGHTS = {"gelu": ("fc_in", "fc_out"), "swiglu": ("gate", "up", "down"), "relu2": ("up", "down")}  # input first


@functools.cache
def cpu_has_bf16_matrix_unit() -> bool:
    """Whether this host's CPU multiplies bfloat16 matrices in hardware (Intel AMX), read from /proc/cpuinfo."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def compute_dtype(setting: str, backend: str) -> str:
    """`model.dtype` with "auto" resolved without measuring anything: bfloat16 on GPUs and TPUs; on a CPU,
    bfloat16 only with a bfloat16 matrix unit, else float32. Training resolves "auto" by measured matmul peaks
    instead (`lmjax.train.metrics.training_dtype`) and records the result in the run's config."""
    if setting != "auto":
        return setting
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16_matrix_unit() else "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model.*` knobs of `lmjax.config.base_config` (see there); `num_kv_heads`, `head_dim` and `mlp` hold
    their resolved values, never 0 or ""."""

    family: str
    vocab_size: int
    vocab_multiple: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int
    d_ff: int
    seq_len: int
    dropout: float
    dtype: str
    param_dtype: str
    cache_dtype: str
    norm_eps: float
    rope_theta: float
    rope_scaling: str
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_context: int
    tie_embeddings: bool
    qkv_bias: bool
    mlp: str
    qk_norm: bool
    zero_init_out: bool
    logit_softcap: float
    remat: str
    attention: str
    scan_layers: bool

    @classmethod
    def from_config(cls, cfg: "ConfigDict | ModelConfig") -> "ModelConfig":
        """The ModelConfig of the `cfg.model` ConfigDict (a ModelConfig is returned as it is)."""
        if isinstance(cfg, ModelConfig):
            return cfg
        values = {f.name: cfg[f.name] for f in dataclasses.fields(cls)}
        values["num_kv_heads"] = cfg.num_kv_heads or cfg.num_heads
        values["head_dim"] = cfg.head_dim or cfg.d_model // cfg.num_heads
        values["mlp"] = cfg.mlp or FAMILY[cfg.family].mlp
        values["dtype"] = compute_dtype(cfg.dtype, jax.default_backend())
        return cls(**values)

    @property
    def arch(self) -> Family:
        """What the family fixes: norm, positions, attention biases."""
        return FAMILY[self.family]

    def rope_frequencies(self) -> np.ndarray:
        """RoPE's inverse frequencies [head_dim / 2] (float32), with Llama 3's scaling when `rope_scaling` is
        "llama3": wavelengths longer than `rope_original_context / rope_low_freq_factor` are divided by
        `rope_factor`, those shorter than `... / rope_high_freq_factor` kept, and those between blended."""
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        if self.rope_scaling == "llama3":
            wavelength = 2 * np.pi / inv_freq
            low, high = self.rope_original_context / self.rope_low_freq_factor, \
                self.rope_original_context / self.rope_high_freq_factor
            scaled = np.where(wavelength > low, inv_freq / self.rope_factor, inv_freq)
            smooth = (self.rope_original_context / wavelength - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor)
            blended = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
            inv_freq = np.where((wavelength >= high) & (wavelength <= low), blended, scaled)
        return inv_freq.astype(np.float32)

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and columns of the output projection: `vocab_size` rounded up to a multiple
        of `vocab_multiple`; the logits of the padding ids are masked.

        The padding depends on this knob alone, never on the mesh: a checkpoint keeps its shapes on any
        mesh. The default 128 is a multiple of every power-of-two `mesh.tensor` up to 128, so the vocabulary
        axis still splits evenly across tensor-parallel devices (and matmul tiles)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

