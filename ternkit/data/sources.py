"""Where training text comes from: the standard library, local files, or a Hub dataset, as documents."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TYPE_CHECKING

from ternkit.errors import TernkitError, is_disk_full

if TYPE_CHECKING:  # annotations only: the recipe schema imports nothing from here
    from ternkit.recipe import DataConfig

__all__ = ["TextSource", "expand_paths", "fingerprint", "first_non_utf8", "hash_int", "stdlib_files", "text_source"]

def hash_int(*parts: Any) -> int:
    """A stable 63-bit integer hash of ``parts`` (Python's ``hash`` is salted per process)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (cache keys, task identities)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]




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


def _stdlib_source(cfg: DataConfig) -> TextSource:
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


def first_non_utf8(path: Path, chunk: int = 1 << 20) -> tuple[int, int, int] | None:
    """(byte offset, byte value, line number) of the first byte of ``path`` that is not UTF-8, or None if all are.

    Reads ``chunk`` bytes at a time, so a large file is scanned in bounded memory.
    """
    base = 0  # file offset of buf[0]
    lines = 0  # newlines before buf[0]
    buf = b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            buf += block
            try:
                buf.decode("utf-8")
                good = len(buf)
            except UnicodeDecodeError as exc:
                if block and exc.end == len(buf) and exc.reason == "unexpected end of data":
                    good = exc.start  # a character cut by the chunk boundary: decide with the next chunk
                else:
                    return base + exc.start, buf[exc.start], lines + buf.count(b"\n", 0, exc.start) + 1
            if not block:
                return None
            lines += buf.count(b"\n", 0, good)
            base += good
            buf = buf[good:]


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (datasets wraps the real one)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _unreadable_data_file(path: Path, builder: str, exc: BaseException, hf_cache: Path) -> str:
    """The sentence for a data file ``datasets`` could not load: not UTF-8, a full disk, or a malformed file."""
    full = next((e for e in _causes(exc) if is_disk_full(e)), None)
    if full is not None:
        return (f"could not cache data file '{path}' in {hf_cache} ({full.strerror or 'disk full'}); free some disk "
                "space or point data.cache_dir at a disk with room, then run again.")
    if builder != "parquet":  # text, JSON and CSV must be UTF-8; only now, on the error path, scan for the byte
        try:
            bad = first_non_utf8(path)
        except OSError as err:
            return f"cannot read data file '{path}' ({err.strerror or type(err).__name__}); check its permissions."
        if bad is not None:
            offset, value, line = bad
            return (f"data file '{path}' is not UTF-8 text (byte {offset}, 0x{value:02x}, on line {line}); convert it "
                    f"to UTF-8 (e.g. iconv -f latin1 -t utf-8 '{path}' > converted{path.suffix}) or drop it from "
                    "data.paths.")
    return (f"could not read data file '{path}' as {builder} ({type(exc).__name__}: {exc}); fix the file or its "
            "extension.")


def _files_source(cfg: DataConfig, cache_dir: Path) -> TextSource:
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
                    raise TernkitError(_unreadable_data_file(p, builder, exc, cache_dir / "hf")) from None
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


def _hub_source(cfg: DataConfig, cache_dir: Path) -> TextSource:
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


def text_source(cfg: DataConfig, cache_dir: str | os.PathLike[str]) -> TextSource:
    """The ``TextSource`` for a ``DataConfig`` whose source is stdlib, files or hub (checks paths now)."""
    cache = Path(cache_dir)
    if cfg.source == "stdlib":
        return _stdlib_source(cfg)
    if cfg.source == "files":
        return _files_source(cfg, cache)
    if cfg.source == "hub":
        return _hub_source(cfg, cache)
    raise TernkitError(f"data.source '{cfg.source}' is a synthetic task, not text; use the task generators instead.")
