"""SentencePiece tokenizer with exact round-trips, byte fallback and chat special tokens."""

import io
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_SENTENCE_CHARS = 2048  # documents are cut at line breaks into training sentences this long
MAX_TRAIN_SENTENCES = 200_000  # SentencePiece samples this many sentences from bigger corpora


def training_sentences(docs: Iterable[str], max_chars: int = MAX_SENTENCE_CHARS) -> Iterator[str]:
    """Cut documents at line breaks into pieces of at most `max_chars` characters.

    Newlines stay inside the pieces so the tokenizer learns them; a single line
    longer than `max_chars` is cut wherever it must be.
    """
    for doc in docs:
        sentence = ""
        for line in doc.splitlines(keepends=True):
            if sentence and len(sentence) + len(line) > max_chars:
                yield sentence
                sentence = ""
            sentence += line
            while len(sentence) > max_chars:
                yield sentence[:max_chars]
                sentence = sentence[max_chars:]
        if sentence:
            yield sentence


class Tokenizer:
    """A trained SentencePiece model; `encode` never adds BOS/EOS."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError):
            raise ValueError(f"{source} is not a valid SentencePiece model file") from None
        self.model_proto = model_proto
        self._special_ids = {tok: self.sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        if any(i == self.sp.unk_id() for i in self._special_ids.values()):
            raise ValueError(f"{source} lacks the chat special tokens {SPECIAL_TOKENS}")
        n = self.sp.get_piece_size()
        self._hidden = np.array([self.sp.is_control(i) for i in range(n)])
        self._hidden[list(self._special_ids.values())] = True

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load `path/tokenizer.model` (or `path` itself if it is a file)."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read tokenizer model {path}: {e.strerror or e}") from None
        return cls(proto, source=str(path))

    def save(self, out_dir: str | Path) -> Path:
        """Write the model to `out_dir/tokenizer.model` and return that path."""
        path = Path(out_dir) / MODEL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.model_proto)
        os.replace(tmp, path)
        return path

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the chat special tokens, e.g. {"<|user|>": 5}."""
        return dict(self._special_ids)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode ids to text, dropping pad/bos/eos, the chat special tokens and out-of-vocab ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return self.sp.decode([int(i) for i in ids[~self._hidden[ids]]])

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each token adds to decoded text (0 for hidden tokens)."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = 1
            elif not (self._hidden[i] or self.sp.is_unknown(i) or self.sp.is_unused(i)):
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode())
        return out


def train_tokenizer(docs: Iterable[str], vocab_size: int, out_dir: str | Path, kind: str = "bpe") -> Tokenizer:
    """Train a SentencePiece model of type `kind` (bpe, unigram or char) on `docs`.

    Identity normalisation plus byte fallback make `decode(encode(text)) == text`
    for any text; ids are pad=0, unk=1, bos=2, eos=3, then the chat special tokens.
    Writes `out_dir/tokenizer.model`.
    """
    if kind not in ("bpe", "unigram", "char"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; use bpe, unigram or char")
    proto = io.BytesIO()
    spm.set_random_generator_seed(0)
    with open(os.devnull, "w") as quiet:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_sentences(docs),
                model_writer=proto,
                logstream=quiet,
                minloglevel=2,
                model_type=kind,
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                add_dummy_prefix=False,
                split_digits=True,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                user_defined_symbols=list(SPECIAL_TOKENS),
                max_sentence_length=4 * MAX_SENTENCE_CHARS,
                input_sentence_size=MAX_TRAIN_SENTENCES,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
            )
        except RuntimeError as e:
            raise ValueError(f"tokenizer training failed (is the corpus empty?): {e}") from None
    tokenizer = Tokenizer(proto.getvalue())
    tokenizer.save(out_dir)
    return tokenizer


def tokenizer_stats(tokenizer: Tokenizer, docs: Iterable[str], batch: int = 1000) -> dict[str, float]:
    """Compression and coverage on `docs`: UTF-8 bytes per token, and the share of tokens that are
    byte-fallback pieces (characters the vocabulary does not cover)."""
    is_byte = np.array([tokenizer.sp.is_byte(i) for i in range(tokenizer.vocab_size)])
    n_docs = n_bytes = n_tokens = n_fallback = 0
    docs = iter(docs)
    while chunk := list(itertools.islice(docs, batch)):
        for text, ids in zip(chunk, tokenizer.encode_batch(chunk), strict=True):
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(ids)
            n_fallback += int(is_byte[ids].sum()) if ids else 0
    return {"documents": n_docs, "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": n_bytes / max(n_tokens, 1), "byte_fallback_share": n_fallback / max(n_tokens, 1)}
