"""Hugging Face tokenizers (`tokenizer.json`, read by the `tokenizers` library) behind lmjax's tokenizer
interface, with the model's own Jinja chat template.

A saved tokenizer is a directory in Hugging Face's layout: `tokenizer.json`, `tokenizer_config.json` (the
bos/eos/pad tokens and the chat template) and, when the model has one, `generation_config.json` (whose
`eos_token_id` list says where replies end). Plain text never encodes to a special token: `encode` reads
special-token text as ordinary characters, and `render_chat` leaves only the template's own markers special.
"""

import datetime
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np
import tokenizers

from lmjax.config import DataError
from lmjax.text.io import atomic_write

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where newer Hugging Face releases keep the chat template
SPECIAL_TOKENS_FILE = "special_tokens_map.json"  # where older releases name bos/eos/pad


def _bytes_to_unicode() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _bytes_to_unicode()


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizer.json` tokenizer; `encode` never adds bos/eos and never yields a special id."""

    def __init__(self, tokenizer_json: str, config: dict, generation: dict | None = None, source: str = "<memory>"):
        try:
            self.tk = tokenizers.Tokenizer.from_str(tokenizer_json)
            self._text_tk = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise DataError(f"{source} is not a valid tokenizer.json: {e}") from None
        self._text_tk.encode_special_tokens = True
        self.tokenizer_json, self.config, self.generation = tokenizer_json, dict(config), dict(generation or {})
        self.source = source
        self._special_ids = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self._hidden = np.zeros(self.vocab_size, bool)
        self._hidden[list(self._special_ids.values())] = True

        def token_id(key: str) -> int | None:
            text = _token_text(self.config.get(key))
            if text is None:
                return None
            found = self.tk.token_to_id(text)
            if found is None:
                raise DataError(f"{source}: {CONFIG_FILE} names {key} {text!r}, which is not in the vocabulary")
            return found

        generation_eos = self.generation.get("eos_token_id")
        generation_bos = self.generation.get("bos_token_id")
        generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        generation_eos = [i for i in generation_eos if isinstance(i, int) and 0 <= i < self.vocab_size]
        eos = token_id("eos_token")
        if eos is None and not generation_eos:
            raise DataError(f"{source}: no eos_token in {CONFIG_FILE} and no eos_token_id in {GENERATION_FILE}: "
                            "nothing says where text ends")
        self._eos = eos if eos is not None else generation_eos[0]
        bos = token_id("bos_token")
        if bos is None and isinstance(generation_bos, int) and 0 <= generation_bos < self.vocab_size:
            bos = generation_bos
        self._bos = self._eos if bos is None else bos  # models without one (Qwen2) start documents after an eos
        pad = token_id("pad_token")
        self._pad = self._eos if pad is None else pad
        self._stop = sorted({self._eos, *generation_eos, *([self._special_ids["<|end|>"]]
                                                             if "<|end|>" in self._special_ids else [])})
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self._compiled = _environment().from_string(self.chat_template) if self.chat_template else None
        decoder = json.loads(tokenizer_json).get("decoder") or {}
        self._byte_level = '"ByteLevel"' in json.dumps(decoder)

    @classmethod
    def load(cls, path: str | Path, model_config: dict | None = None) -> "HFTokenizer":
        """Load a directory holding tokenizer.json (and optionally tokenizer_config.json, special_tokens_map.json,
        generation_config.json, chat_template.jinja); DataError naming what is missing or malformed. Without a
        generation_config.json, the token ids of `model_config` (the model's config.json) stand in for it."""
        path = Path(path)
        try:
            tokenizer_json = (path / TOKENIZER_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path / TOKENIZER_FILE}: {e}") from None
        config = {**_read_json(path / SPECIAL_TOKENS_FILE), **_read_json(path / CONFIG_FILE)}
        if (path / TEMPLATE_FILE).is_file() and not config.get("chat_template"):
            config["chat_template"] = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        generation = _read_json(path / GENERATION_FILE) or {
            k: v for k, v in (model_config or {}).items() if k in ("bos_token_id", "eos_token_id")}
        return cls(tokenizer_json, config, generation, source=str(path))

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json (if any) to `out_dir`;
        return the tokenizer.json path."""
        out_dir = Path(out_dir)
        atomic_write(out_dir / TOKENIZER_FILE, self.tokenizer_json)
        atomic_write(out_dir / CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        if self.generation:
            atomic_write(out_dir / GENERATION_FILE, json.dumps(self.generation, indent=2) + "\n")
        return out_dir / TOKENIZER_FILE

    def with_chat_template(self, template: str, special_tokens: Sequence[str]) -> "HFTokenizer":
        """A copy with the Jinja chat `template` and its `special_tokens` (those not in the vocabulary yet get
        new ids at its end)."""
        tk = tokenizers.Tokenizer.from_str(self.tokenizer_json)
        tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special_tokens
                               if t not in self._special_ids])
        # The template's bos/eos, by name as Jinja (ours and transformers') sees them.
        names = {key: self.tk.id_to_token(i) for key, i in (("bos_token", self._bos), ("eos_token", self._eos))
                 if _token_text(self.config.get(key)) is None}
        return HFTokenizer(tk.to_str(), {**self.config, **names, "chat_template": template}, self.generation,
                           self.source)

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the special tokens, e.g. {"<|im_start|>": 151644}."""
        return dict(self._special_ids)

    @property
    def fingerprint(self) -> str:
        """A short hash of the tokenizer and its chat template: equal fingerprints, identical tokenization."""
        digest = hashlib.sha256(self.tokenizer_json.encode())
        digest.update(json.dumps([self.chat_template, self._bos, self._eos, self._pad, self._stop]).encode())
        return digest.hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: eos, the generation config's eos ids and lmjax's `<|end|>` if present."""
        return list(self._stop)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token text included as plain characters."""
        return self._text_tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, on all cores."""
        return [e.ids for e in self._text_tk.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str, special: bool) -> tuple[list[int], list[int]]:
        """(ids, the character offset where each token starts) of `text`; with `special`, special-token text
        becomes the special ids (for a rendered template's own markers only)."""
        encoding = (self.tk if special else self._text_tk).encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The chat template rendered as `transformers`' `apply_chat_template(tokenize=False)` renders it."""
        if self._compiled is None:
            raise DataError(f"{self.source} has no chat template")
        names = {key: _token_text(value) for key, value in self.config.items()
                 if key.endswith("_token") and _token_text(value) is not None}
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **names)
        except jinja2.TemplateError as e:
            raise DataError(f"{self.source}: the chat template failed: {e}") from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode ids to text, dropping special tokens and out-of-vocab ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return self.tk.decode([int(i) for i in ids[~self._hidden[ids]]], skip_special_tokens=True)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id as text, as APIs show single tokens (bytes that are not whole characters as U+FFFD; special
        tokens as their names)."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                out.append("")
            elif self._hidden[i]:
                out.append(self.tk.id_to_token(i))
            else:
                out.append(bytes(self.token_utf8(i)).decode("utf-8", errors="replace"))
        return out

    def token_utf8(self, token_id: int) -> list[int]:
        """The UTF-8 bytes one token stands for (a special token: none)."""
        if not 0 <= token_id < self.vocab_size or self._hidden[token_id]:
            return []
        piece = self.tk.id_to_token(token_id)
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return [_BYTE_OF_CHAR[c] for c in piece]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return [int(piece[3:5], 16)]
        return list(piece.replace("\u2581", " ").encode())

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each token adds to decoded text (0 for special tokens)."""
        return np.array([len(self.token_utf8(i)) for i in range(self.vocab_size)], dtype=np.int32)


def _environment() -> jinja2.Environment:
    """A sandboxed Jinja environment with the settings and helpers chat templates are written for (those of
    `transformers`: trimmed blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`)."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _read_json(path: Path) -> dict:
    """The JSON object in `path` ({} if there is no such file); DataError if it is malformed."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} does not hold a JSON object")
    return value
