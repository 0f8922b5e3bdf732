"""The token cache: a deterministic document-level train/val split, tokenized once into memory-mapped files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TYPE_CHECKING

import numpy as np

from ternkit.errors import TernkitError, is_disk_full
from ternkit.tokenizer import ByteTokenizer, Tok, build_tokenizer, load_tokenizer, write_text_atomic

from ternkit.data.sources import fingerprint, hash_int, text_source

if TYPE_CHECKING:  # annotations only: the recipe schema imports nothing from here
    from ternkit.recipe import DataConfig, TokenizerConfig

__all__ = ["TokenData", "prepare_text_data", "split_documents"]

_CACHE_VERSION = 1
# Documents are split by a hash of their index salted with this constant, not with the training seed,
# so val loss stays comparable across seeds.
_SPLIT_SALT = "ternkit-split-v1"
_MIN_DOCS_FOR_DOC_SPLIT = 20




def split_documents(doc_lengths: Sequence[int], val_fraction: float) -> np.ndarray | None:
    """Boolean mask (n_docs,) of validation documents, or None when there are too few documents to split by document.

    Documents are ranked by a stable hash of their index; the first ones in that order go to
    validation until they hold ``val_fraction`` of all characters, so the split is the same every
    run, proportionate, and at least one document lands in each split. With fewer than 20
    documents the caller splits the token stream instead (the last ``val_fraction`` of it).
    """
    n = len(doc_lengths)
    if n < _MIN_DOCS_FOR_DOC_SPLIT:
        return None
    order = sorted(range(n), key=lambda i: hash_int(_SPLIT_SALT, i))
    target = val_fraction * float(sum(doc_lengths))
    mask = np.zeros(n, dtype=bool)
    taken = 0.0
    for i in order[:-1]:  # never all of them
        if taken >= target:
            break
        mask[i] = True
        taken += doc_lengths[i]
    return mask


@dataclass
class TokenData:
    """A tokenized corpus: memory-mapped train/val token arrays, its tokenizer and metadata."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tok
    meta: dict[str, Any]
    directory: Path
    reused: bool

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer."""
        return int(self.meta["vocab_size"])


def _encode_docs(tok: Tok, docs: Sequence[str], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token arrays for ``docs``, each followed by the end-of-document id."""
    eos = tok.eos_id
    tail = np.array([eos], dtype=dtype) if eos is not None else np.zeros(0, dtype=dtype)
    if isinstance(tok, ByteTokenizer):
        for d in docs:
            yield np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(dtype)
            yield tail
        return
    batch_fn = getattr(tok, "encode_batch", None)
    for i in range(0, len(docs), 256):
        chunk = list(docs[i : i + 256])
        ids = batch_fn(chunk) if batch_fn else [tok.encode(d) for d in chunk]
        for one in ids:
            yield np.asarray(one, dtype=dtype)
            yield tail


def _write_tokens(path: Path, arrays: Iterator[np.ndarray]) -> int:
    """Write the token ``arrays`` one after another to ``path`` through a temporary file; returns the token count.

    A failed write removes the temporary file and leaves ``path`` as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as fh:
            for a in arrays:
                # Through the file object, not ndarray.tofile: its C-level writes bypass Python's error
                # reporting (a full disk surfaces as a bare "N requested and M written").
                fh.write(np.ascontiguousarray(a).data)
                n += a.size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _open_tokens(path: Path, dtype: str, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _cached(directory: Path) -> dict[str, Any] | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    item = np.dtype(meta.get("dtype", "uint16")).itemsize
    for split in ("train", "val"):
        f = directory / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != item * int(meta.get(f"{split}_tokens", -1)):
            return None
    return meta


def open_token_cache(cache: str | os.PathLike[str], fp: str, tok: Tok | None = None) -> TokenData | None:
    """The complete token cache ``cache/tokens/<fp>`` as memory-mapped splits, or None when it is missing or partial.

    ``tok``: the tokenizer to attach; None loads the one stored beside the tokens.
    """
    from ternkit.tokenizer import load_tokenizer

    directory = Path(cache) / "tokens" / fp
    meta = _cached(directory)
    if meta is None or meta.get("fingerprint", fp) != fp:
        return None
    return TokenData(
        train=_open_tokens(directory / "train.bin", meta["dtype"], int(meta["train_tokens"])),
        val=_open_tokens(directory / "val.bin", meta["dtype"], int(meta["val_tokens"])),
        tokenizer=tok if tok is not None else load_tokenizer(directory), meta=meta, directory=directory,
        reused=True,
    )


def _cache_write_failed(err: OSError, directory: Path) -> str:
    """The sentence for a token cache ``directory`` that could not be written."""
    reason = err.strerror or type(err).__name__
    if is_disk_full(err):
        fix = "free some disk space or point data.cache_dir at a disk with room"
    else:
        fix = "point data.cache_dir at a folder you can write to"
    return (f"could not write the token cache {directory} ({reason}), so nothing was trained and the partial cache "
            f"was removed: {fix}, then run again.")


def _build_cache(directory: Path, fp: str, tok: Tok, docs: list[str], val_mask: np.ndarray | None,
                 val_fraction: float, description: str) -> dict[str, Any]:
    """Tokenize ``docs`` into ``directory`` (train.bin, val.bin, tokenizer.json, then meta.json); returns the meta.

    meta.json, written last and atomically, is what marks a cache complete. A failed write (full
    disk, no permission) removes what this build wrote and raises one :class:`TernkitError`
    sentence, so a later run rebuilds the cache instead of reading a partial one.
    """
    made = not directory.exists()
    written = [directory / name for name in ("meta.json", "train.bin", "val.bin", "tokenizer.json")]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A meta.json here describes files that did not match it (else the cache was reused):
        # drop it first, so that a build that stops half-way never leaves a complete-looking cache.
        (directory / "meta.json").unlink(missing_ok=True)
        dtype = np.dtype(np.uint16 if tok.vocab_size < 65536 else np.uint32)
        if val_mask is not None:
            n_train = _write_tokens(directory / "train.bin", _encode_docs(tok, [d for d, v in zip(docs, val_mask) if not v], dtype))
            n_val = _write_tokens(directory / "val.bin", _encode_docs(tok, [d for d, v in zip(docs, val_mask) if v], dtype))
            split = "document"
        else:
            stream = np.concatenate(list(_encode_docs(tok, docs, dtype)))
            cut = int(round(stream.size * (1 - val_fraction)))
            n_train = _write_tokens(directory / "train.bin", iter([stream[:cut]]))
            n_val = _write_tokens(directory / "val.bin", iter([stream[cut:]]))
            split = "stream"
        meta = {
            "version": _CACHE_VERSION, "fingerprint": fp, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "tokenizer_kind": tok.kind, "source": description, "split": split,
            "documents": len(docs), "val_documents": int(val_mask.sum()) if val_mask is not None else 0,
            "chars": sum(len(d) for d in docs), "train_tokens": n_train, "val_tokens": n_val,
        }
        tok.save(directory)
        write_text_atomic(directory / "meta.json", json.dumps(meta, indent=1))  # last: marks a complete cache
    except OSError as err:
        # Free the space this build took (the disk may be full) and leave no partial token files.
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise TernkitError(_cache_write_failed(err, directory)) from None
    return meta


def prepare_text_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, cache_dir: str | os.PathLike[str]) -> TokenData:
    """Read, split, tokenize and cache a text corpus; reuse the cache when nothing it depends on changed.

    The cache key covers the source (file paths, sizes, mtimes or Hub name), ``max_chars``,
    ``max_files``, ``val_fraction`` and the tokenizer's full JSON, so any change re-tokenizes.
    """
    cache = Path(cache_dir).expanduser()
    source = text_source(data_cfg, cache)
    corpus_fp = {"v": _CACHE_VERSION, "corpus": source.fingerprint, "val_fraction": data_cfg.val_fraction}

    docs: list[str] | None = None
    val_mask: np.ndarray | None = None

    def load_docs() -> tuple[list[str], np.ndarray | None]:
        d = list(source.documents())
        if not d:
            raise TernkitError(f"the data source ({source.description}) produced no text; point data.paths at non-empty files.")
        return d, split_documents([len(x) for x in d], data_cfg.val_fraction)

    def train_texts(d: list[str], m: np.ndarray | None) -> list[str]:
        if m is None:  # stream split: train the tokenizer on the leading (1 - val_fraction) of the text
            joined = "".join(d)
            return [joined[: int(len(joined) * (1 - data_cfg.val_fraction))]]
        return [x for x, v in zip(d, m) if not v]

    if tok_cfg.kind == "bpe":
        tok_dir = cache / "tokenizers" / fingerprint({"corpus": corpus_fp, "tok": tok_cfg.model_dump(mode="json")})
        if (tok_dir / "tokenizer.json").is_file():
            tok = load_tokenizer(tok_dir)
        else:
            docs, val_mask = load_docs()
            try:
                tok = build_tokenizer(tok_cfg, train_texts(docs, val_mask), tok_dir)
            except OSError as err:  # tokenizer.json is written atomically: nothing half-written stays
                raise TernkitError(_cache_write_failed(err, tok_dir)) from None
        tok_json = (tok_dir / "tokenizer.json").read_text(encoding="utf-8")
    elif tok_cfg.kind == "byte":
        tok = ByteTokenizer()
        tok_json = tok.to_hf_json()
    else:
        tok = load_tokenizer(tok_cfg.path)
        tok_json = json.dumps({"kind": tok.kind, "vocab": tok.vocab_size, "hf": getattr(getattr(tok, "hf", None), "to_str", lambda: "")()})

    fp = fingerprint({"corpus": corpus_fp, "tokenizer": hashlib.sha256(tok_json.encode()).hexdigest()})
    data = open_token_cache(cache, fp, tok)
    if data is None:
        if docs is None:
            docs, val_mask = load_docs()
        _build_cache(cache / "tokens" / fp, fp, tok, docs, val_mask, data_cfg.val_fraction, source.description)
        data = open_token_cache(cache, fp, tok)
        assert data is not None, "a token cache just built must open"
        data.reused = False
    if int(data.meta["train_tokens"]) == 0:
        raise TernkitError(f"the data source ({source.description}) tokenized to an empty training split; add more text.")
    return data
