"""The serving benchmark's model, built once and cached under a work directory (serve.py's --work); compress.py
and gguf_roundtrip.py reuse the helpers:

- tokenizer/: a SentencePiece tokenizer trained by `lmjax tokenizer train --source stdlib --vocab-size 4096`;
- hf/: a randomly initialised (seeded) `transformers.LlamaForCausalLM` of configs/tiny.py's shape, float32,
  saved with that tokenizer as `tokenizer.model` and a LlamaTokenizer config. The output rows of the control
  and byte-fallback pieces are zeroed: their logit is exactly 0 while the best of the ~3,800 others is well
  above, so greedy decoding never ends early and never emits partial UTF-8. Every request then yields
  exactly its `max_tokens` tokens on every server, each token a non-empty piece of text;
- run/: that checkpoint imported with `lmjax.interop.hf.load_hf_checkpoint` and written as an lmjax run
  directory (config.json, tokenizer/, an Orbax checkpoint); its logits are checked against transformers';
- model-f32.gguf: the same checkpoint converted by llama.cpp's `convert_hf_to_gguf.py` (from the
  llama-cpp-python sdist), when the llama.cpp venv (serve.py's --llamacpp-python) exists.
"""

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
DEFAULT_LLAMACPP_PYTHON = Path.home() / ".cache/lmjax/llamacpp-venv/bin/python"
DEFAULT_CONVERTER_GLOB = str(Path.home() / ".cache/lmjax/sdist/llama_cpp_python-*/vendor/llama.cpp"
                             / "convert_hf_to_gguf.py")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The benchmark model's shape (configs/tiny.py) and the seed of its random weights."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    seq_len: int
    norm_eps: float
    rope_theta: float
    seed: int

    @classmethod
    def from_tiny(cls, seed: int) -> "ModelSpec":
        from lmjax.config import load_config

        tiny = load_config(REPO / "configs" / "tiny.py")
        m = tiny.model
        return cls(vocab_size=tiny.tokenizer.vocab_size, d_model=m.d_model,
                   num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
                   head_dim=m.head_dim or m.d_model // m.num_heads, d_ff=m.d_ff, seq_len=m.seq_len,
                   norm_eps=m.norm_eps, rope_theta=m.rope_theta, seed=seed)


@dataclasses.dataclass(frozen=True)
class Artefacts:
    """Where the built tokenizer, HF checkpoint, lmjax run directory and GGUF (if any) are."""

    tokenizer_dir: Path
    hf_dir: Path
    run_dir: Path
    gguf: Path | None


def build_artefacts(work: Path, spec: ModelSpec, llamacpp_python: Path | None, converter: Path | None) -> Artefacts:
    """Creates (or reuses, when built for the same `spec`) everything the servers load."""
    stamp = work / "spec.json"
    wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if stamp.is_file() and stamp.read_text() != wanted:
        print(f"[build] {work} was built for another model; rebuilding", flush=True)
        for name in ("tokenizer", "hf", "run", "model-f32.gguf"):
            target = work / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)
    tokenizer_dir = make_tokenizer(work / "tokenizer", spec)
    hf_dir = make_hf_checkpoint(work / "hf", tokenizer_dir, spec)
    run_dir = make_run_dir(work / "run", hf_dir, tokenizer_dir)
    gguf = None
    if llamacpp_python is not None and converter is not None:
        gguf = make_gguf(work / "model-f32.gguf", hf_dir, llamacpp_python, converter)
    return Artefacts(tokenizer_dir, hf_dir, run_dir, gguf)


def make_tokenizer(out: Path, spec: ModelSpec) -> Path:
    """The project's own tokenizer, trained by its CLI on the embedded stdlib corpus."""
    if not (out / "tokenizer.model").is_file():
        print("[build] training the tokenizer (lmjax tokenizer train)", flush=True)
        subprocess.run([str(VENV_BIN / "lmjax"), "tokenizer", "train", "--source", "stdlib",
                        "--vocab-size", str(spec.vocab_size), "--out", str(out)], check=True)
    return out


def non_text_ids(tokenizer_dir: Path) -> list[int]:
    """Ids of the pieces that are not plain text: control (pad, bos, eos, chat markers), unknown and byte pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    return [i for i in range(sp.get_piece_size())
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)]


def make_hf_checkpoint(out: Path, tokenizer_dir: Path, spec: ModelSpec) -> Path:
    """A seeded random LlamaForCausalLM (float32) with the tokenizer, as `save_pretrained` writes it."""
    if out.is_dir():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from lmjax.text.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

    print(f"[build] random LlamaForCausalLM (seed {spec.seed}) -> {out}", flush=True)
    hf_logging.set_verbosity_error()
    torch.manual_seed(spec.seed)
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                         max_position_embeddings=spec.seq_len, rms_norm_eps=spec.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[non_text_ids(tokenizer_dir)] = 0.0
    model.generation_config.pad_token_id = PAD_ID
    partial = _fresh(out.with_name(out.name + ".partial"))
    model.save_pretrained(partial)
    shutil.copy(tokenizer_dir / "tokenizer.model", partial / "tokenizer.model")
    pieces = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    ids = {"unk_token": UNK_ID, "bos_token": BOS_ID, "eos_token": EOS_ID, "pad_token": PAD_ID}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer", **pieces, "add_bos_token": True, "add_eos_token": False,
        "add_prefix_space": False, "legacy": False, "model_max_length": spec.seq_len,
        "added_tokens_decoder": {str(ids[k]): {"content": v, "special": True, "lstrip": False, "rstrip": False,
                                               "normalized": False, "single_word": False} for k, v in pieces.items()},
    }
    (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (partial / "special_tokens_map.json").write_text(json.dumps(pieces, indent=2))
    partial.rename(out)
    return out


def _fresh(path: Path) -> Path:
    """An empty directory at `path` (a leftover of an interrupted build is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_run_dir(out: Path, hf_dir: Path, tokenizer_dir: Path) -> Path:
    """Imports the HF checkpoint into an lmjax run directory that `lmjax serve --workdir` loads, and checks
    that the restored model's logits match transformers'."""
    if out.is_dir():
        return out
    import jax

    from lmjax.config import base_config, validate
    from lmjax.interop.hf import load_hf_checkpoint
    from lmjax.run.checkpoint import Checkpointer
    from lmjax.run.workdir import Workdir
    from lmjax.text.tokenizer import Tokenizer

    print(f"[build] importing {hf_dir} into the lmjax run directory {out}", flush=True)
    model_cfg, params = load_hf_checkpoint(hf_dir, dtype="float32")
    tokenizer = Tokenizer.load(tokenizer_dir)
    cfg = base_config()
    cfg.model = model_cfg
    cfg.tokenizer.vocab_size = tokenizer.vocab_size
    validate(cfg)
    wd = Workdir(_fresh(out.with_name(out.name + ".partial")))
    wd.save_config(cfg)
    tokenizer.save(wd.tokenizer_dir)
    state = {"step": np.int32(0), "params": jax.device_put(params), "opt_state": {},
             "rng": jax.random.PRNGKey(0)}
    with Checkpointer(wd.checkpoint_dir) as ckpt:
        ckpt.save(state)
    check_logits(wd.path, hf_dir)
    wd.path.rename(out)
    return out


def check_logits(run_dir: Path, hf_dir: Path) -> None:
    """Compares the restored lmjax model's logits with transformers' on one prompt; raises if they differ."""
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM

    from lmjax.run.restore import restore_model
    from lmjax.run.workdir import open_workdir

    cfg, graphdef, params, _, _ = restore_model(open_workdir(run_dir))
    ids = np.arange(8, 8 + 24, dtype=np.int32)[None] * 37 % cfg.model.vocab_size
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    ours, _ = nnx.merge(graphdef, params)(jnp.asarray(ids), positions, jnp.ones_like(positions))
    ours = np.asarray(ours[0, :, :cfg.model.vocab_size], np.float32)
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(hf_dir).eval()(torch.from_numpy(ids.astype(np.int64))).logits[0]
    diff = float(np.abs(ours - theirs.numpy()).max())
    print(f"[build] lmjax vs transformers logits on a 24-token prompt: max |diff| {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise RuntimeError(f"the imported run's logits differ from transformers' by {diff}")


def make_gguf(out: Path, hf_dir: Path, python: Path, converter: Path, outtype: str = "f32") -> Path:
    """The HF checkpoint as a GGUF of `outtype` (f32, f16, q8_0), written by llama.cpp's converter in the llama.cpp
    venv."""
    if out.is_file():
        return out
    print(f"[build] converting {hf_dir} to {out} with {converter}", flush=True)
    src = converter.parent
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}"}
    partial = out.with_name(out.name + ".partial")
    done = subprocess.run([str(python), str(converter), str(hf_dir), "--outtype", outtype, "--outfile", str(partial)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    partial.rename(out)
    return out
