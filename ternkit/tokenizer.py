"""Tokenizers: raw bytes (256 ids), a byte-level BPE trained on the training split, or a given tokenizer.json.

Every tokenizer saves as a Hugging Face ``tokenizer.json`` that ``tokenizers.Tokenizer.from_file``
can load anywhere: the byte tokenizer is written as a byte-level BPE with no merges whose id for
each byte equals the byte's value, so an exported model ships one self-describing file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

from ternkit.errors import TernkitError, read_utf8

__all__ = [
    "Tok",
    "ByteTokenizer",
    "HFTokenizer",
    "EOS_TOKEN",
    "build_tokenizer",
    "load_tokenizer",
    "train_bpe",
    "bytes_to_unicode",
    "write_text_atomic",
]

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tok(Protocol):
    """What the rest of ternkit needs from a tokenizer."""

    kind: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | os.PathLike[str]) -> Path: ...


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; nothing to train. Id 0 (the NUL byte, absent from text) separates documents."""

    kind = "byte"
    vocab_size = 256
    eos_id: int | None = 0

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as a list of ints."""
        return list(text.encode("utf-8"))

    def encode_to_bytes(self, text: str) -> bytes:
        """The UTF-8 bytes of ``text`` (fast path for building token files)."""
        return text.encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; invalid UTF-8 (e.g. a sample cut mid-character) becomes U+FFFD."""
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json string (byte-level BPE, no merges, id = byte value)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        b2u = bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` into ``directory``; return its path."""
        out = Path(directory) / TOKENIZER_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, self.to_hf_json())
        return out


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (e.g. a trained byte-level BPE) behind ternkit's small interface."""

    kind = "bpe"

    def __init__(self, tokenizer: "object") -> None:
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]
        self.eos_id: int | None = tokenizer.token_to_id(EOS_TOKEN)  # type: ignore[attr-defined]

    @property
    def hf(self) -> "object":
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]  # type: ignore[attr-defined]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)  # type: ignore[attr-defined]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` into ``directory``; return its path."""
        out = Path(directory) / TOKENIZER_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, self._tok.to_str())  # type: ignore[attr-defined]
        return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (utf-8) to ``path`` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        # A full disk leaves a partial temporary file: remove it (and free its space) before reporting.
        tmp.unlink(missing_ok=True)
        raise


def _is_byte_json(obj: dict) -> bool:
    """True when a tokenizer.json is exactly ternkit's byte tokenizer (id = byte value, no merges, no added tokens)."""
    if obj.get("type") == "ternkit-byte":
        return True
    model = obj.get("model") or {}
    if not isinstance(model, dict):
        return False  # not ours; the tokenizers library says what is wrong with it
    if model.get("type") != "BPE" or model.get("merges") or obj.get("added_tokens"):
        return False
    b2u = bytes_to_unicode()
    return model.get("vocab") == {b2u[b]: b for b in range(256)}


def load_tokenizer(path: str | os.PathLike[str]) -> Tok:
    """Load a tokenizer from a ``tokenizer.json`` file or a folder holding one."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise TernkitError(f"tokenizer file '{p}' not found; point tokenizer.path at a tokenizer.json or a folder holding one.")
    text = read_utf8(p, f"tokenizer file '{p}'", "check its permissions or use another tokenizer.json.",
                     "it is not a tokenizer.json: replace it with a Hugging Face tokenizer.json (for a trained "
                     "model, the one in its run folder).")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TernkitError(f"tokenizer file '{p}' is not valid JSON (line {exc.lineno}); use a Hugging Face tokenizer.json.") from None
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(obj), "null")
        raise TernkitError(f"tokenizer file '{p}' holds a JSON {kind}, not an object; use a Hugging Face "
                           "tokenizer.json.")
    if _is_byte_json(obj):
        return ByteTokenizer()
    from tokenizers import Tokenizer

    try:
        return HFTokenizer(Tokenizer.from_str(text))
    except Exception as exc:  # the Rust library raises a plain Exception on malformed files
        raise TernkitError(f"tokenizer file '{p}' could not be loaded by the tokenizers library ({exc}); use a Hugging Face tokenizer.json.") from None


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style, ``<|endoftext|>`` as id 0) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok)


def build_tokenizer(cfg: "object", texts: Iterable[str] | None, out_dir: str | os.PathLike[str]) -> Tok:
    """Make the tokenizer a ``TokenizerConfig`` asks for and save it as ``out_dir/tokenizer.json``.

    ``texts`` (the training split's documents) are read only for ``kind="bpe"``.
    """
    kind = getattr(cfg, "kind")
    tok: Tok
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "bpe":
        if texts is None:
            raise TernkitError("tokenizer.kind is 'bpe' but there is no text to train it on; use tokenizer.kind=byte for synthetic data.")
        tok = train_bpe(texts, vocab_size=getattr(cfg, "vocab_size"), min_frequency=getattr(cfg, "min_frequency", 2))
        if tok.vocab_size <= 257:
            raise TernkitError("the BPE tokenizer learned no merges (the corpus is too small); add text or use tokenizer.kind=byte.")
    elif kind == "file":
        tok = load_tokenizer(getattr(cfg, "path"))
    else:
        raise TernkitError(f"unknown tokenizer.kind {kind!r}; use byte, bpe or file.")
    tok.save(out_dir)
    return tok
