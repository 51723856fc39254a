"""SentencePiece tokenizer with exact round-trips, byte fallback and chat special tokens.

`encode_batch` keeps the ids of the words it has seen (a word: a run of spaces, then the non-space characters
after it). A BPE or char model that splits at whitespace never makes a piece across that boundary, so a word
encodes the same wherever it occurs, and on real text most words are frequent ones looked up instead of encoded
(tested against SentencePiece on whole texts); a unigram model's best segmentation is not always per word, so it
always encodes whole texts.

The chat markers are SentencePiece control pieces: only `encode_chat` puts them in by id, so no text
(a user's message included) encodes to them. A saved tokenizer is `tokenizer.model` plus
`tokenizer_format.json` holding {"format": FORMAT}.
"""

import hashlib
import io
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lmjax.config import DataError
from lmjax.text.hf_tokenizer import TOKENIZER_FILE, HFTokenizer
from lmjax.text.io import atomic_write

MODEL_FILE = "tokenizer.model"
FORMAT_FILE = "tokenizer_format.json"
# 1: the chat markers were user-defined pieces, which SentencePiece cuts out of any text (prompt injection);
# 2: they are control pieces, which no text encodes to.
FORMAT = 2
RETRAIN = ("train a new one (`lmjax tokenizer train`, or delete it and rerun `lmjax data prepare`) "
           "and start a new run with it")
SPACE_MARK = "\u2581"  # SentencePiece's stand-in for " ": decode turns it into a space
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_SENTENCE_CHARS = 2048  # documents are cut at line breaks into training sentences this long
MAX_TRAIN_SENTENCES = 200_000  # SentencePiece samples this many sentences from bigger corpora
BYTE_PIECES = 256  # byte fallback: one piece per byte value, so any text encodes
META_PIECES = 4 + len(SPECIAL_TOKENS)  # pad, unk, bos, eos and the chat markers
# Vocabulary size a char tokenizer is trained with: room for every Unicode character, so it keeps all it sees.
CHAR_VOCAB_BOUND = sys.maxunicode + 1 + BYTE_PIECES + META_PIECES
WORD = re.compile(r" *[^ ]+| +")  # a word as SentencePiece splits at whitespace (only " " is whitespace to it)
WORD_CACHE = 1 << 17  # words whose ids a tokenizer keeps (tens of MB); later new words are encoded every time
WORD_CACHE_CHARS = 48  # longer words (base64, long lines without spaces) are encoded every time, never kept


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
    """A trained SentencePiece model; `encode` never adds BOS/EOS and never yields a control id."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError):
            raise DataError(f"{source} is not a valid SentencePiece model file") from None
        self.model_proto = model_proto
        self._special_ids = {tok: self.sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        if any(i == self.sp.unk_id() for i in self._special_ids.values()):
            raise DataError(f"{source} lacks the chat special tokens {SPECIAL_TOKENS}")
        if not all(self.sp.is_control(i) for i in self._special_ids.values()):
            raise DataError(f"{source} is an old-format tokenizer (format 1): text can produce its chat markers "
                            f"(prompt injection); {RETRAIN}")
        self._space_mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        if not all(self.sp.is_byte(i) for i in self._space_mark_ids):
            raise DataError(f"{source} has no byte-fallback pieces, so it cannot encode every text; {RETRAIN}")
        self._hidden = np.array([self.sp.is_control(i) for i in range(self.sp.get_piece_size())])
        self._word_ids: dict[str, list[int]] | None = {} if _splits_into_words(model_proto) else None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load `path/tokenizer.model` (or `path` itself if it is a file); DataError for a tokenizer
        that is unreadable or of another format."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read tokenizer model {path}: {e.strerror or e}") from None
        _check_format_file(path.with_name(FORMAT_FILE))
        return cls(proto, source=str(path))

    def save(self, out_dir: str | Path) -> Path:
        """Write the model to `out_dir/tokenizer.model` and its format to `out_dir/tokenizer_format.json`;
        return the model's path."""
        path = Path(out_dir) / MODEL_FILE
        atomic_write(path, self.model_proto)
        atomic_write(path.with_name(FORMAT_FILE), json.dumps({"format": FORMAT}) + "\n")
        return path

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the chat special tokens, e.g. {"<|user|>": 5}."""
        return dict(self._special_ids)

    @property
    def fingerprint(self) -> str:
        """A short hash of the model file: equal fingerprints, identical tokenization."""
        return hashlib.sha256(self.model_proto).hexdigest()[:16]

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

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: eos and `<|end|>`."""
        return [self.eos_id, self._special_ids["<|end|>"]]

    chat_template = None  # lmjax's own chat markers (lmjax/text/chat_template.py), not a Jinja template

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `decode` gives back exactly `text`."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, new words (or whole texts, see the module docstring) on all cores."""
        parts = [text.split(SPACE_MARK) for text in texts]
        flat = [p for ps in parts for p in ps]
        encoded = iter(self._spm_encode(flat) if self._word_ids is None else self._encode_words(flat))
        return [self._join([next(encoded) for _ in ps]) for ps in parts]

    def _spm_encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)

    def _encode_words(self, texts: list[str]) -> list[list[int]]:
        """SentencePiece's ids of `texts` (without the space mark), word by word: known words looked up, new
        short ones encoded together and kept while the cache has room."""
        words = [WORD.findall(text) for text in texts]
        known = self._word_ids
        new = list(dict.fromkeys(w for ws in words for w in ws if w not in known))
        found = dict(zip(new, self._spm_encode(new), strict=True))
        if len(known) < WORD_CACHE:
            known.update((w, ids) for w, ids in found.items() if len(w) <= WORD_CACHE_CHARS)
        return [list(itertools.chain.from_iterable([known.get(w) or found[w] for w in ws])) for ws in words]

    def _join(self, parts: list[list[int]]) -> list[int]:
        """The ids of text pieces that were cut at SPACE_MARK, with the mark spelled in byte pieces between
        them (as a piece, SentencePiece would decode it to a space)."""
        ids = parts[0]
        for part in parts[1:]:
            ids += self._space_mark_ids + part
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode ids to text, dropping pad/bos/eos, the chat special tokens and out-of-vocab ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return self.sp.decode([int(i) for i in ids[~self._hidden[ids]]])

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id's piece as text (the space mark shown as a space; byte pieces as `<0xNN>`; special tokens as
        their names): how APIs show single tokens, e.g. in log-probabilities."""
        return [self.sp.id_to_piece(int(i)).replace(SPACE_MARK, " ") if 0 <= i < self.vocab_size else "" for i in ids]

    def token_utf8(self, token_id: int) -> list[int]:
        """The UTF-8 bytes one token stands for (a byte piece: its byte; a special token: none)."""
        if not 0 <= token_id < self.vocab_size or self._hidden[token_id]:
            return []
        if self.sp.is_byte(token_id):
            return [int(self.sp.id_to_piece(token_id)[3:5], 16)]
        return list(self.sp.id_to_piece(token_id).replace(SPACE_MARK, " ").encode())

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each token adds to decoded text (0 for hidden tokens)."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = 1
            elif not (self._hidden[i] or self.sp.is_unknown(i) or self.sp.is_unused(i)):
                out[i] = len(self.sp.id_to_piece(i).replace(SPACE_MARK, " ").encode())
        return out


def _splits_into_words(model_proto: bytes) -> bool:
    """Whether the model's pieces never cross `WORD` boundaries: BPE or char, split at whitespace (kept as a
    prefix, runs of it allowed as pieces), no whitespace normalisation or dummy prefix (how lmjax trains)."""
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(model_proto)
    t, n = m.trainer_spec, m.normalizer_spec
    return (t.model_type in (t.BPE, t.CHAR) and t.split_by_whitespace and not t.treat_whitespace_as_suffix
            and t.allow_whitespace_only_pieces and not n.remove_extra_whitespaces and not n.add_dummy_prefix
            and n.name == "identity" and not n.precompiled_charsmap)


def load_tokenizer(path: str | Path) -> "Tokenizer | HFTokenizer":
    """The tokenizer saved in directory `path`: a Hugging Face `tokenizer.json` if there is one, else lmjax's
    SentencePiece `tokenizer.model`."""
    path = Path(path)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file() and not (path / MODEL_FILE).is_file():
        return HFTokenizer.load(path)
    return Tokenizer.load(path)


def has_tokenizer(path: str | Path) -> bool:
    """Whether directory `path` holds a saved tokenizer of either kind."""
    return (Path(path) / MODEL_FILE).is_file() or (Path(path) / TOKENIZER_FILE).is_file()


def train_tokenizer(docs: Iterable[str], vocab_size: int, out_dir: str | Path, kind: str = "bpe") -> Tokenizer:
    """Train a SentencePiece model of type `kind` (bpe, unigram or char) on `docs`.

    Identity normalisation plus byte fallback make `decode(encode(text)) == text`
    for any text; ids are pad=0, unk=1, bos=2, eos=3, then the chat special tokens as control pieces.
    A char tokenizer ignores `vocab_size`: it has one piece per character seen (each encodes to one
    token), plus the 256 byte pieces and the special tokens. Saves the tokenizer to `out_dir` (see
    `Tokenizer.save`).
    """
    if kind not in ("bpe", "unigram", "char"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; use bpe, unigram or char")
    # SentencePiece's default coverage leaves the rarest characters to byte fallback; char keeps them all.
    size, coverage = (CHAR_VOCAB_BOUND, 1.0) if kind == "char" else (vocab_size, 0.9995)
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
                vocab_size=size,
                character_coverage=coverage,
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
                control_symbols=list(SPECIAL_TOKENS),
                max_sentence_length=4 * MAX_SENTENCE_CHARS,
                input_sentence_size=MAX_TRAIN_SENTENCES,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
            )
        except RuntimeError as e:
            raise DataError(f"tokenizer training failed (is the corpus empty?): {e}") from None
    tokenizer = Tokenizer(proto.getvalue())
    tokenizer.save(out_dir)
    return tokenizer


def describe_size(tokenizer: Tokenizer, kind: str, vocab_size: int) -> str:
    """The size of a tokenizer that `train_tokenizer(..., vocab_size, kind=kind)` made, for log lines."""
    if kind != "char":
        return f"{tokenizer.vocab_size} tokens"
    chars = tokenizer.vocab_size - BYTE_PIECES - META_PIECES
    return (f"{tokenizer.vocab_size} tokens: {chars} characters seen, {BYTE_PIECES} bytes, {META_PIECES} special; "
            f"a char tokenizer ignores the vocabulary size {vocab_size}")


def _check_format_file(path: Path) -> None:
    """DataError unless the format file `path` is missing (a bare model file: its piece types decide)
    or says FORMAT."""
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text(encoding="utf-8"))["format"]
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if type(found) is not int:
        raise DataError(f"{path} is unreadable (expected {{\"format\": {FORMAT}}}); {RETRAIN}")
    if found > FORMAT:
        raise DataError(f"{path}: tokenizer format {found} is newer than this lmjax reads ({FORMAT}); upgrade lmjax")
    if found != FORMAT:
        raise DataError(f"{path}: tokenizer format {found} is no longer supported (lmjax needs {FORMAT}); {RETRAIN}")


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
