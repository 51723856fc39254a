"""Hugging Face tokenizer directories for the tests, trained here with the `tokenizers` library on the embedded
corpus: byte-level BPE as GPT-2 and Qwen2 use it, with and without a chat template. The templates are written
in the style of the models' own (ChatML; Llama 3's headers with trimmed content)."""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmjax.corpus.stdlib_docs import topic_documents

CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADERS = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
           "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
           "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def byte_level_tokenizer(out: Path, specials: list[str], config: dict, vocab_size: int = 700,
                         generation: dict | None = None) -> Path:
    """Writes tokenizer.json (+ tokenizer_config.json, generation_config.json) to `out`; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(topic_documents(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def gpt2_style(out: Path) -> Path:
    """No chat template, one special token that is bos, eos and unk (GPT-2's layout)."""
    return byte_level_tokenizer(out, ["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                         "unk_token": "<|endoftext|>"})


def chatml_style(out: Path) -> Path:
    """Qwen2-Instruct's layout: no bos, eos is the end-of-turn marker, pad is <|endoftext|>."""
    return byte_level_tokenizer(out, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                 "chat_template": CHATML},
                                generation={"bos_token_id": 0, "eos_token_id": [2, 0]})


def headers_style(out: Path) -> Path:
    """Llama 3-Instruct's layout: a bos, headers around the role, <|eot_id|> ends turns."""
    return byte_level_tokenizer(out, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"],
                                {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                 "chat_template": HEADERS},
                                generation={"bos_token_id": 0, "eos_token_id": [1, 4]})
