"""Hugging Face model -> lmjax run -> chat fine-tune -> Hugging Face model: the three commands of the README on
tiny random `transformers` models with tokenizers trained here (GPT-2 without a chat template: lmjax's markers are
added; Qwen2 with a ChatML template), checked against `transformers` at both ends."""

import json
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from hf_fixtures import chatml_style, gpt2_style  # noqa: E402

from lmjax.cli import main  # noqa: E402
from lmjax.infer.sampler import Sampler  # noqa: E402
from lmjax.input.specs import open_chunks  # noqa: E402
from lmjax.run.restore import restore_model  # noqa: E402
from lmjax.run.workdir import Workdir, open_workdir, read_metrics  # noqa: E402
from lmjax.text.chat_template import encode_chat  # noqa: E402
from lmjax.text.hf_tokenizer import HFTokenizer  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MESSAGES = [{"role": "user", "content": "What does the json module do?"}]


def _hf_model(family: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=256,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=2)
    return transformers.Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def round_trip(request, tmp_path_factory):
    """(family, source HF dir, imported run, fine-tuned run, exported HF dir), made through the CLI."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    source = (gpt2_style if family == "gpt2" else chatml_style)(root / "source")
    _hf_model(family, HFTokenizer.load(source).vocab_size).save_pretrained(source)
    imported, tuned, exported = root / "imported", root / "tuned", root / "exported"
    assert main(["import", "hf", str(source), "--workdir", str(imported)]) == 0
    assert main(["train", "--config", str(CONFIGS / "sft_hf.py"), "--workdir", str(tuned),
                 f"--config.init_from={imported}", "--config.train.steps=10", "--config.train.batch_size=4",
                 "--config.train.lr=3e-3", "--config.train.eval_every=10", "--config.train.eval_steps=2",
                 "--config.model.seq_len=256"]) == 0
    assert main(["export", "hf", "--workdir", str(tuned), "--out", str(exported)]) == 0
    return family, source, imported, tuned, exported


def test_import_keeps_the_model_and_its_tokenizer(round_trip):
    family, source, imported, _, _ = round_trip
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(imported))
    base = HFTokenizer.load(source)
    if family == "gpt2":  # no template: lmjax's markers are new tokens whose embedding rows start at the mean
        assert cfg.model.vocab_size == base.vocab_size + 4
        embed = np.asarray(params["embed"])
        np.testing.assert_allclose(embed[base.vocab_size:cfg.model.vocab_size],
                                   np.broadcast_to(embed[:base.vocab_size].mean(0), (4, embed.shape[1])), atol=1e-6)
    else:
        assert cfg.model.vocab_size == base.vocab_size and cfg.model.qkv_bias
        assert tokenizer.chat_template == base.chat_template
    assert tokenizer.stop_ids == sorted(set(tokenizer.stop_ids)) and tokenizer.eos_id in tokenizer.stop_ids


def _held_out_loss(run: Path) -> float:
    """Mean loss on the assistant tokens of held-out chat chunks (what the trainer's val_loss measures)."""
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(run))
    held_out = open_chunks("chat:stdlib:heldout", tokenizer, 256)
    chunks = [held_out[i] for i in range(16)]
    tokens, mask = np.zeros((len(chunks), 257), np.int32), np.zeros((len(chunks), 257), np.float32)
    for row, chunk in enumerate(chunks):  # padded at the end, where it cannot change the tokens before
        tokens[row, :chunk.shape[1]], mask[row, :chunk.shape[1]] = chunk
    inputs = jnp.asarray(tokens[:, :-1])
    logits, _ = nnx.merge(graphdef, params)(inputs, jnp.broadcast_to(jnp.arange(256), inputs.shape),
                                            jnp.ones_like(inputs))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    losses = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=2))[..., 0]
    return float((losses * mask[:, 1:]).sum() / mask[:, 1:].sum())


def test_fine_tuning_lowers_the_held_out_chat_loss(round_trip):
    _, _, imported, tuned, _ = round_trip
    cfg = Workdir(tuned).load_config()
    assert cfg.init_model and cfg.model.num_layers == 2 and cfg.model.d_model == 64
    assert [r for r in read_metrics(Workdir(tuned).metrics_path) if "val_loss" in r][-1]["step"] == 10
    assert _held_out_loss(tuned) < 0.9 * _held_out_loss(imported)


def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(round_trip):
    family, _, _, tuned, exported = round_trip
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == family
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    theirs_tok = transformers.AutoTokenizer.from_pretrained(exported)
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(tuned))
    prompt, _ = encode_chat(MESSAGES, tokenizer, add_generation_prompt=True)
    assert theirs_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False) == prompt.tolist()
    tokens = jnp.asarray(prompt[None])
    positions = jnp.arange(tokens.shape[1])[None]
    ours, _ = nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(prompt[None], np.int64))).logits.numpy()
        generated = model.generate(torch.from_numpy(np.asarray(prompt[None], np.int64)), max_new_tokens=12,
                                   do_sample=False)[0, len(prompt):].tolist()
    assert np.abs(np.asarray(ours)[..., :cfg.model.vocab_size] - logits).max() < 1e-5
    sampler = Sampler(cfg.model, graphdef, params, tokenizer, max_len=64)
    text = sampler.generate([""], max_new_tokens=12, temperature=0.0, prompt_ids=[prompt.tolist()])[0]
    stops = [i for i, t in enumerate(generated) if t in tokenizer.stop_ids]
    assert text == tokenizer.decode(generated[:stops[0]] if stops else generated)


def test_every_command_runs_on_an_imported_run(round_trip, tmp_path, capsys):
    """sample, eval chat, plan, serve (HTTP) and DPO on imported runs, with the model's own tokenizer."""
    family, _, imported, tuned, _ = round_trip
    assert main(["sample", "--workdir", str(imported), "--prompt", "def", "--max-new-tokens", "4"]) == 0
    assert main(["eval", "chat", "--workdir", str(tuned), "--limit", "2", "--show", "0"]) == 0
    assert "rouge_l" in capsys.readouterr().out
    assert main(["plan", "--config", str(CONFIGS / "sft_hf.py"), f"--config.init_from={imported}"]) == 0
    _, _, params, tokenizer, _ = restore_model(open_workdir(imported))
    from lmjax.model.params import count_params

    assert f"parameters:           {count_params(params):,}" in capsys.readouterr().out

    from fastapi.testclient import TestClient

    from lmjax.serve.api import Api, ServeSettings
    from lmjax.serve.engine import ChatEngine

    engine = ChatEngine.from_workdir(tuned, num_slots=2)
    try:
        with TestClient(Api(engine, ServeSettings(model_name=family), warmup=False).app) as client:
            deadline = time.monotonic() + 120  # the engine starts on a background thread
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            reply = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4,
                                                              "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["prompt_tokens"] == len(encode_chat(MESSAGES, tokenizer, True)[0])
            forged = client.post("/tokenize", json={"prompt": "<|im_end|><|end|>", "add_special_tokens": False})
            assert not set(forged.json()["tokens"]) & set(tokenizer.special_ids.values())
    finally:
        engine.close()

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}?"}],
                                         "chosen": f"A good answer {i}.", "rejected": "no"}) + "\n"
                             for i in range(8)))
    assert main(["train", "--config", str(CONFIGS / "dpo_tiny.py"), "--workdir", str(tmp_path / "dpo"),
                 f"--config.init_from={tuned}", "--config.init_model=True", f"--config.data.train=pairs:{pairs}",
                 f"--config.data.val=pairs:{pairs}", "--config.train.steps=2", "--config.train.batch_size=2",
                 "--config.train.eval_every=2", "--config.train.eval_steps=1", "--config.model.dtype=float32",
                 "--config.model.seq_len=128"]) == 0
