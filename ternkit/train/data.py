"""Training data: text sources, a cached memory-mapped token file, step-indexed sampling, synthetic tasks.

The pipeline for text is: a source yields documents (Python's standard library, local
text/jsonl/parquet files, or a Hub dataset) -> a deterministic document-level train/val split ->
a tokenizer (``ternkit.tokenizer``) -> one flat token file per split, memory-mapped,
cached under ``data.cache_dir`` by a fingerprint of the inputs, so a second run reuses it.

Sampling is a pure function of ``(seed, step)``: ``batch_indices`` gives the windows of global
micro-batch ``step``, so a run resumed at step N sees exactly what an uninterrupted run would.
Batches are ``(x, y)`` LongTensors of shape (B, T); positions that carry no loss (padding, MQAR's
non-query tokens, every parity position but the last in validation) hold ``IGNORE_INDEX`` in ``y``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import sysconfig
import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from ternkit.errors import TernkitError
from ternkit.tokenizer import ByteTokenizer, Tok, build_tokenizer, load_tokenizer, write_text_atomic

__all__ = [
    "IGNORE_INDEX",
    "PARITY_VOCAB",
    "TextSource",
    "TokenData",
    "TokenDataset",
    "StepBatches",
    "TernkitDataModule",
    "batch_indices",
    "text_source",
    "stdlib_files",
    "split_documents",
    "prepare_text_data",
    "parity_examples",
    "mqar_examples",
    "mask_targets",
]

IGNORE_INDEX = -100
_CACHE_VERSION = 1
# Parity task ids: bits are 0 and 1 (also the parity classes), BOS opens every string, padding fills short ones.
PARITY_ZERO, PARITY_ONE, PARITY_BOS, PARITY_PAD = 0, 1, 2, 3
PARITY_VOCAB = 4
# Documents are split by a hash of their index salted with this constant, not with the training seed,
# so val loss stays comparable across seeds.
_SPLIT_SALT = "ternkit-split-v1"
_MIN_DOCS_FOR_DOC_SPLIT = 20


def _hash_int(*parts: Any) -> int:
    """A stable 63-bit integer hash of ``parts`` (Python's ``hash`` is salted per process)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------- sources


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The ``.py`` files of this Python's standard library (no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune: site-packages can dwarf the stdlib
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    return files[:max_files] if max_files else files


def _stat_list(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return out


def _cap(docs: Iterator[str], max_chars: int | None, max_files: int | None) -> Iterator[str]:
    """Yield non-empty documents until ``max_files`` documents or ``max_chars`` characters (the last one cut)."""
    total = 0
    count = 0
    for doc in docs:
        if not doc:
            continue
        if max_chars is not None and total + len(doc) > max_chars:
            doc = doc[: max_chars - total]
        if doc:
            yield doc
            total += len(doc)
            count += 1
        if (max_chars is not None and total >= max_chars) or (max_files is not None and count >= max_files):
            return


@dataclass
class TextSource:
    """A deterministic stream of documents plus a cheap fingerprint of what it would read."""

    description: str
    fingerprint: dict[str, Any]
    _docs: Callable[[], Iterator[str]] = field(repr=False)

    def documents(self) -> Iterator[str]:
        """The documents, in a fixed order, already capped by ``max_chars`` / ``max_files``."""
        return self._docs()


def _stdlib_source(cfg: Any) -> TextSource:
    files = stdlib_files(cfg.max_files)

    def docs() -> Iterator[str]:
        def read() -> Iterator[str]:
            for p in files:
                try:
                    yield p.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue  # a few test files are deliberately not UTF-8
        return _cap(read(), cfg.max_chars, None)

    fp = {"source": "stdlib", "root": sysconfig.get_paths()["stdlib"], "files": _stat_list(files),
          "max_chars": cfg.max_chars, "max_files": cfg.max_files}
    return TextSource(f"Python {sysconfig.get_python_version()} standard library ({len(files)} files)", fp, docs)


_TEXT_EXT = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json",
             ".csv": "csv"}


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Expand files and globs (``**`` allowed) into a sorted, de-duplicated file list; errors name the path."""
    out: dict[str, Path] = {}
    for pat in patterns:
        expanded = os.path.expanduser(pat)
        if glob.has_magic(expanded):
            hits = sorted(Path(h) for h in glob.glob(expanded, recursive=True) if Path(h).is_file())
            if not hits:
                raise TernkitError(f"data.paths pattern '{pat}' matched no files; check the path (relative to {os.getcwd()}).")
        else:
            p = Path(expanded)
            if p.is_dir():
                hits = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
                if not hits:
                    raise TernkitError(f"data folder '{pat}' holds no files; put text/jsonl/parquet files there.")
            elif p.is_file():
                hits = [p]
            else:
                raise TernkitError(f"data file '{pat}' not found; fix data.paths (relative to {os.getcwd()}).")
        for h in hits:
            out.setdefault(str(h.resolve()), h)
    return [out[k] for k in sorted(out)]


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _column(ds: Any, text_field: str, what: str) -> Iterator[str]:
    if text_field not in ds.column_names:
        raise TernkitError(
            f"{what} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); set data.text_field to the text column."
        )
    for row in ds:
        val = row[text_field]
        if isinstance(val, str):
            yield val


def _files_source(cfg: Any, cache_dir: Path) -> TextSource:
    files = expand_paths(cfg.paths)
    if cfg.max_files:
        files = files[: cfg.max_files]

    def docs() -> Iterator[str]:
        def read() -> Iterator[str]:
            datasets = _quiet_datasets()
            for p in files:
                builder = _TEXT_EXT.get(p.suffix.lower(), "text")
                kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
                try:
                    ds = datasets.load_dataset(builder, data_files=[str(p)], split="train",
                                               cache_dir=str(cache_dir / "hf"), **kwargs)
                except Exception as exc:  # datasets raises many types for a malformed file
                    raise TernkitError(f"could not read data file '{p}' as {builder} ({type(exc).__name__}: {exc}); fix the file or its extension.") from None
                yield from _column(ds, "text" if builder == "text" else cfg.text_field, f"data file '{p}'")
        return _cap(read(), cfg.max_chars, None)

    fp = {"source": "files", "files": _stat_list(files), "text_field": cfg.text_field,
          "max_chars": cfg.max_chars, "max_files": cfg.max_files}
    return TextSource(f"{len(files)} local file(s)", fp, docs)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 within ``timeout`` seconds (DNS included)."""
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # getaddrinfo has no timeout of its own; don't wait on it
    return result[0]


def _hub_source(cfg: Any, cache_dir: Path) -> TextSource:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    hint = "download it on a connected machine and train on the files with data.source=files data.paths=[...]"
    if not offline and not _hub_reachable():
        raise TernkitError(f"cannot reach the Hugging Face Hub to fetch '{cfg.hub_name}' (no network); {hint}.")

    def docs() -> Iterator[str]:
        def read() -> Iterator[str]:
            datasets = _quiet_datasets()
            try:
                ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=not offline,
                                           cache_dir=str(cache_dir / "hf"))
                if offline:
                    yield from _column(ds, cfg.text_field, f"dataset '{cfg.hub_name}'")
                else:
                    for row in ds:
                        if cfg.text_field not in row:
                            raise TernkitError(f"dataset '{cfg.hub_name}' has no column '{cfg.text_field}' (columns: {', '.join(row)}); set data.text_field.")
                        if isinstance(row[cfg.text_field], str):
                            yield row[cfg.text_field]
            except TernkitError:
                raise
            except Exception as exc:
                raise TernkitError(f"could not load Hub dataset '{cfg.hub_name}' ({type(exc).__name__}: {exc}); {hint}.") from None
        return _cap(read(), cfg.max_chars, cfg.max_files)

    fp = {"source": "hub", "name": cfg.hub_name, "config": cfg.hub_config, "split": cfg.hub_split,
          "text_field": cfg.text_field, "max_chars": cfg.max_chars, "max_files": cfg.max_files}
    return TextSource(f"Hub dataset {cfg.hub_name}", fp, docs)


def text_source(cfg: Any, cache_dir: str | os.PathLike[str]) -> TextSource:
    """The ``TextSource`` for a ``DataConfig`` whose source is stdlib, files or hub (checks paths now)."""
    cache = Path(cache_dir)
    if cfg.source == "stdlib":
        return _stdlib_source(cfg)
    if cfg.source == "files":
        return _files_source(cfg, cache)
    if cfg.source == "hub":
        return _hub_source(cfg, cache)
    raise TernkitError(f"data.source '{cfg.source}' is a synthetic task, not text; use the task generators instead.")


# ------------------------------------------------------------------------------ split + tokens


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
    order = sorted(range(n), key=lambda i: _hash_int(_SPLIT_SALT, i))
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    with open(tmp, "wb") as fh:
        for a in arrays:
            a.tofile(fh)
            n += a.size
    os.replace(tmp, path)
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


def prepare_text_data(data_cfg: Any, tok_cfg: Any, cache_dir: str | os.PathLike[str]) -> TokenData:
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
        tok_dir = cache / "tokenizers" / _fingerprint({"corpus": corpus_fp, "tok": tok_cfg.model_dump(mode="json")})
        if (tok_dir / "tokenizer.json").is_file():
            tok = load_tokenizer(tok_dir)
        else:
            docs, val_mask = load_docs()
            tok = build_tokenizer(tok_cfg, train_texts(docs, val_mask), tok_dir)
        tok_json = (tok_dir / "tokenizer.json").read_text(encoding="utf-8")
    elif tok_cfg.kind == "byte":
        tok = ByteTokenizer()
        tok_json = tok.to_hf_json()
    else:
        tok = load_tokenizer(tok_cfg.path)
        tok_json = json.dumps({"kind": tok.kind, "vocab": tok.vocab_size, "hf": getattr(getattr(tok, "hf", None), "to_str", lambda: "")()})

    fp = _fingerprint({"corpus": corpus_fp, "tokenizer": hashlib.sha256(tok_json.encode()).hexdigest()})
    directory = cache / "tokens" / fp
    meta = _cached(directory)
    reused = meta is not None
    if meta is None:
        if docs is None:
            docs, val_mask = load_docs()
        directory.mkdir(parents=True, exist_ok=True)
        dtype = np.dtype(np.uint16 if tok.vocab_size < 65536 else np.uint32)
        if val_mask is not None:
            n_train = _write_tokens(directory / "train.bin", _encode_docs(tok, [d for d, v in zip(docs, val_mask) if not v], dtype))
            n_val = _write_tokens(directory / "val.bin", _encode_docs(tok, [d for d, v in zip(docs, val_mask) if v], dtype))
            split = "document"
        else:
            stream = np.concatenate(list(_encode_docs(tok, docs, dtype)))
            cut = int(round(stream.size * (1 - data_cfg.val_fraction)))
            n_train = _write_tokens(directory / "train.bin", iter([stream[:cut]]))
            n_val = _write_tokens(directory / "val.bin", iter([stream[cut:]]))
            split = "stream"
        meta = {
            "version": _CACHE_VERSION, "fingerprint": fp, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "tokenizer_kind": tok.kind, "source": source.description, "split": split,
            "documents": len(docs), "val_documents": int(val_mask.sum()) if val_mask is not None else 0,
            "chars": sum(len(d) for d in docs), "train_tokens": n_train, "val_tokens": n_val,
        }
        tok.save(directory)
        write_text_atomic(directory / "meta.json", json.dumps(meta, indent=1))  # last: marks a complete cache
    if int(meta["train_tokens"]) == 0:
        raise TernkitError(f"the data source ({source.description}) tokenized to an empty training split; add more text.")
    return TokenData(
        train=_open_tokens(directory / "train.bin", meta["dtype"], int(meta["train_tokens"])),
        val=_open_tokens(directory / "val.bin", meta["dtype"], int(meta["val_tokens"])),
        tokenizer=tok, meta=meta, directory=directory, reused=reused,
    )


# ------------------------------------------------------------------------------------- sampling


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_hash_int("epoch", seed, epoch))
    return torch.randperm(n, generator=g)


def batch_indices(step: int, batch_size: int, seed: int, n_windows: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Window indices (batch_size,) that ``rank`` reads at global micro-batch ``step``.

    Global sample positions ``step*B*W + rank*B + [0, B)`` walk through one seeded random
    permutation of all windows per epoch (epoch = position // n_windows), so the result depends
    only on its arguments: resuming at step k replays exactly the k-th batch of a fresh run, and
    the W ranks of a step read disjoint windows.
    """
    if n_windows <= 0:
        raise ValueError("n_windows must be positive")
    start = (step * world_size + rank) * batch_size
    pos = torch.arange(start, start + batch_size, dtype=torch.long)
    epochs = pos // n_windows
    out = torch.empty(batch_size, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        sel = epochs == e
        out[sel] = _epoch_permutation(n_windows, seed, int(e))[pos[sel] % n_windows]
    return out


class TokenDataset(Dataset):
    """Non-overlapping windows of a flat token array: item i is (x, y), each (context_length,), y = x shifted by one."""

    def __init__(self, tokens: np.ndarray, context_length: int, split: str = "train") -> None:
        self.tokens = tokens
        self.context_length = int(context_length)
        self.n_windows = (len(tokens) - 1) // self.context_length
        if self.n_windows <= 0:
            raise TernkitError(
                f"the {split} split has only {len(tokens)} tokens, fewer than model.context_length+1 ({self.context_length + 1}); "
                "add data, lower model.context_length or change data.val_fraction."
            )

    def __len__(self) -> int:
        return self.n_windows

    def window(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the windows at window indices ``starts`` (B,) into (x, y), each (B, T) int64."""
        t = self.context_length
        rows = np.stack([np.asarray(self.tokens[s * t : s * t + t + 1]) for s in starts.tolist()]).astype(np.int64)
        block = torch.from_numpy(rows)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.window(torch.tensor([int(i)]))
        return x[0], y[0]

    def batch_indices(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Window indices (batch_size,) of global micro-batch ``step`` for ``rank`` (see module ``batch_indices``)."""
        return batch_indices(step, batch_size, seed, self.n_windows, rank, world_size)

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch, each (batch_size, T), of global micro-batch ``step`` for ``rank``."""
        return self.window(self.batch_indices(step, batch_size, seed, rank, world_size))


class StepBatches(IterableDataset):
    """Yields ``batch_fn(step)`` for steps ``start_step, start_step+1, ...`` (forever when ``num_steps`` is None).

    Use with ``DataLoader(ds, batch_size=None)``: batches are already formed. With several loader
    workers, worker w takes steps start+w, start+w+W, ...; the loader's round-robin keeps the order.
    """

    def __init__(self, batch_fn: Callable[[int], Any], start_step: int = 0, num_steps: int | None = None) -> None:
        super().__init__()
        self.batch_fn = batch_fn
        self.start_step = int(start_step)
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + wid
        end = None if self.num_steps is None else self.start_step + self.num_steps
        while end is None or step < end:
            yield self.batch_fn(step)
            step += nw


# ------------------------------------------------------------------------------ synthetic tasks


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def parity_examples(n: int, min_len: int, max_len: int, seed: int | torch.Generator, seq_len: int | None = None,
                    last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running-parity examples: x, y (n, seq_len) int64 and loss_mask (n, seq_len) bool.

    Each row of x is BOS (id 2), then L random bits (ids 0/1, L uniform in [min_len, max_len]),
    then padding id 3 up to ``seq_len`` (default ``max_len + 1``). y[t] is the parity (id 0/1) of the
    bits in x[1..t], so y is 0 at BOS; the model must carry the parity along the whole string, as in
    :mod:`ternkit.models.parity`. The mask supervises BOS and every bit position and never the padding;
    with ``last_only`` it supervises only each row's last bit, whose target is the parity of the whole
    string (the length-generalisation score when used for validation).
    """
    g = _generator(seed)
    seq_len = max_len + 1 if seq_len is None else seq_len
    if seq_len < max_len + 1:
        raise ValueError(f"seq_len {seq_len} is too short for BOS plus {max_len} bits")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"parity lengths need 1 <= min_len <= max_len, got {min_len}..{max_len}")
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    bits = torch.randint(0, 2, (n, seq_len), generator=g)
    pos = torch.arange(seq_len)
    # Position t >= 1 holds bit t-1; a row of length L has its bits at positions 1..L.
    real = (pos[None, :] >= 1) & (pos[None, :] <= lengths[:, None])
    bits = torch.where(real, bits, torch.zeros_like(bits))
    x = torch.where(real, bits, torch.full_like(bits, PARITY_PAD))
    x[:, 0] = PARITY_BOS
    y = torch.cumsum(bits, dim=1) % 2
    if last_only:
        mask = pos[None, :] == lengths[:, None]
    else:
        mask = pos[None, :] <= lengths[:, None]
    y = torch.where(mask, y, torch.zeros_like(y))
    return x.contiguous(), y.contiguous(), mask


def mqar_examples(n: int, vocab_size: int, seq_len: int, num_kv_pairs: int, seed: int | torch.Generator,
                  num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (Zoology-style): x, y (n, seq_len) int64 and loss_mask (n, seq_len) bool.

    x starts with ``num_kv_pairs`` pairs ``k1 v1 k2 v2 ...`` (distinct keys from [1, V/2), values from
    [V/2, V)); the rest is filler id 0 except ``num_queries`` of the keys, asked again at uniformly
    drawn distinct positions. At a query position t, y[t] is that key's value and loss_mask[t] is
    True; elsewhere y is 0 and the mask False. (Zoology spaces queries by a power law; here uniform.)
    """
    g = _generator(seed)
    q = num_kv_pairs if num_queries is None else num_queries
    half = vocab_size // 2
    ctx = 2 * num_kv_pairs
    if num_kv_pairs > half - 1 or q > num_kv_pairs or ctx + q > seq_len:
        raise ValueError("mqar: not enough keys, or seq_len too short for the pairs and queries")
    keys = torch.rand(n, half - 1, generator=g).argsort(dim=1)[:, :num_kv_pairs] + 1
    if num_kv_pairs <= vocab_size - half:
        values = torch.rand(n, vocab_size - half, generator=g).argsort(dim=1)[:, :num_kv_pairs] + half
    else:
        values = torch.randint(half, vocab_size, (n, num_kv_pairs), generator=g)
    x = torch.zeros(n, seq_len, dtype=torch.long)
    x[:, 0:ctx:2] = keys
    x[:, 1:ctx:2] = values
    which = torch.rand(n, num_kv_pairs, generator=g).argsort(dim=1)[:, :q]
    slots = torch.rand(n, seq_len - ctx, generator=g).argsort(dim=1)[:, :q] + ctx
    rows = torch.arange(n)[:, None]
    x[rows, slots] = torch.gather(keys, 1, which)
    y = torch.zeros(n, seq_len, dtype=torch.long)
    y[rows, slots] = torch.gather(values, 1, which)
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    mask[rows, slots] = True
    return x, y, mask


def mask_targets(y: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``y`` with ``IGNORE_INDEX`` wherever ``loss_mask`` is False (same shape)."""
    return torch.where(loss_mask, y, torch.full_like(y, IGNORE_INDEX))


# ---------------------------------------------------------------------------------- datamodule

try:  # lightning is a hard dependency; the guard only keeps the pure-data helpers importable without it
    import lightning as L

    _DMBase: type = L.LightningDataModule
except ImportError:  # pragma: no cover
    _DMBase = object


class TernkitDataModule(_DMBase):  # type: ignore[misc, valid-type]
    """The recipe's data as a LightningDataModule: tokenizer + cached token file, or a synthetic task.

    Train batches come from a ``StepBatches`` iterable that is a pure function of the global
    micro-batch index, so resuming is exact: ``train_dataloader()`` starts at ``start_step`` when
    set, otherwise at ``trainer.global_step * trainer.grad_accum`` of the attached trainer (which
    Lightning has restored from the checkpoint by then). The iterable never ends; stop training
    with ``max_steps`` (and validate with an integer ``val_check_interval``). Under DDP each rank
    reads its own disjoint slice of every global batch. Batches are ``(x, y)``, each (B, T) int64.
    """

    def __init__(self, recipe: Any, run_dir: str | os.PathLike[str], start_step: int | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.start_step = start_step
        self.data: TokenData | None = None
        self.tokenizer: Tok | None = None
        self.train_set: TokenDataset | None = None
        self.val_set: Dataset | None = None
        self._synthetic_vocab: int | None = None
        self._ready = False

    @property
    def cache_dir(self) -> Path:
        """Where token files are cached: ``data.cache_dir`` or ``<run dir>/data``."""
        d = self.recipe.data.cache_dir
        return Path(d).expanduser() if d else self.run_dir / "data"

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer or synthetic task (after ``setup``)."""
        if self.tokenizer is not None:
            return int(self.tokenizer.vocab_size)
        if self._synthetic_vocab is not None:
            return self._synthetic_vocab
        raise RuntimeError("call setup() before reading vocab_size")

    @property
    def fingerprint(self) -> str:
        """Identity of the data the sampler walks over (token cache fingerprint or task parameters)."""
        if self.data is not None:
            return str(self.data.meta["fingerprint"])
        cfg = self.recipe.data
        return _fingerprint({"source": cfg.source, "task": getattr(cfg, cfg.source).model_dump(mode="json")})

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def prepare_data(self) -> None:
        """Tokenize and cache the corpus once (Lightning calls this on one process only)."""
        if not self.recipe.data.synthetic:
            prepare_text_data(self.recipe.data, self.recipe.tokenizer, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and token files (building them if needed) or prepare the synthetic task."""
        if self._ready:
            return
        r = self.recipe
        cfg = r.data
        if cfg.synthetic:
            if cfg.source == "parity":
                self._synthetic_vocab = PARITY_VOCAB
                # Only the last position is scored, so val/acc is the parity of whole eval_len strings.
                x, y, m = parity_examples(cfg.parity.num_val, cfg.parity.eval_len, cfg.parity.eval_len,
                                          _hash_int(r.seed, "val", "parity"), last_only=True)
            else:
                mq = cfg.mqar
                self._synthetic_vocab = mq.vocab_size
                x, y, m = mqar_examples(mq.num_val, mq.vocab_size, mq.seq_len, mq.num_kv_pairs,
                                        _hash_int(r.seed, "val", "mqar"), mq.num_queries)
            self.val_set = TensorDataset(x, mask_targets(y, m))
        else:
            self.data = prepare_text_data(cfg, r.tokenizer, self.cache_dir)
            self.tokenizer = self.data.tokenizer
            ctx = r.model.context_length
            self.train_set = TokenDataset(self.data.train, ctx, "train")
            val = TokenDataset(self.data.val, ctx, "validation")
            n = min(len(val), r.trainer.val_batches * r.trainer.batch_size)
            # Evenly spread fixed windows: the same val batches every evaluation and every run.
            self.val_set = Subset(val, np.linspace(0, len(val) - 1, n).round().astype(int).tolist())
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # A run folder keeps the tokenizer it was trained with; the run decides whether a different one may replace it.
            if self._rank_world()[0] == 0 and not (self.run_dir / "tokenizer.json").exists():
                self.tokenizer.save(self.run_dir)
        if r.model.vocab_size is not None and r.model.vocab_size < self.vocab_size:
            raise TernkitError(
                f"model.vocab_size ({r.model.vocab_size}) is smaller than the data's vocabulary ({self.vocab_size}); "
                "remove model.vocab_size to take it from the tokenizer."
            )
        self._ready = True

    def train_batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch, each (batch_size, T) int64, of global micro-batch ``step`` for ``rank``."""
        r = self.recipe
        bs = r.trainer.batch_size
        cfg = r.data
        if cfg.source == "parity":
            p = cfg.parity
            x, y, m = parity_examples(bs, p.train_len_min, p.train_len_max, _hash_int(r.seed, "parity", step, rank, world_size))
            return x, mask_targets(y, m)
        if cfg.source == "mqar":
            mq = cfg.mqar
            x, y, m = mqar_examples(bs, mq.vocab_size, mq.seq_len, mq.num_kv_pairs,
                                    _hash_int(r.seed, "mqar", step, rank, world_size), mq.num_queries)
            return x, mask_targets(y, m)
        assert self.train_set is not None, "call setup() first"
        return self.train_set.batch(step, bs, r.seed, rank, world_size)

    def resume_step(self) -> int:
        """The global micro-batch index training continues from (see the class docstring)."""
        if self.start_step is not None:
            return int(self.start_step)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_step) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        return 0

    def train_dataloader(self) -> DataLoader:
        """Endless, step-indexed train batches starting at ``resume_step()``."""
        self.setup()
        rank, world = self._rank_world()
        ds = StepBatches(lambda s: self.train_batch(s, rank, world), start_step=self.resume_step())
        nw = self.recipe.trainer.num_workers
        return DataLoader(ds, batch_size=None, num_workers=nw, persistent_workers=nw > 0)

    def val_dataloader(self) -> DataLoader:
        """Fixed validation batches (the same windows or examples every time)."""
        self.setup()
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.recipe.trainer.batch_size, shuffle=False,
                          num_workers=self.recipe.trainer.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records about the data, to check on resume that it is unchanged."""
        return {"fingerprint": self.fingerprint, "seed": int(self.recipe.seed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when resuming onto different data or seed (the replayed batches would then differ)."""
        if not self._ready:
            self.setup()
        if state_dict.get("fingerprint") != self.fingerprint or state_dict.get("seed") != int(self.recipe.seed):
            warnings.warn("resuming with different data or seed than the checkpoint: the batch order will not replay exactly",
                          stacklevel=2)
