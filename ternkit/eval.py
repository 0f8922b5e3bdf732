"""Score a checkpoint or an export on text: mean loss (nats/token), perplexity and bits per UTF-8 byte.

Bits per byte (total nats / ln 2 / bytes of the scored text) is what makes a byte-tokenizer run and a
BPE run comparable; loss per token is not, since their tokens cover different amounts of text.
Two kinds of text: files (``data``), scored in non-overlapping windows of the model's context length,
or, without files, the run's own validation split, scored batch for batch as training validated it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ternkit.errors import TernkitError, read_utf8
from ternkit.tokenizer import ByteTokenizer, Tok

__all__ = ["evaluate", "check_eval_args", "check_json_path", "write_json"]

#: ``progress(done, total)``: called with the number of batches scored so far and the number in all.
Progress = Callable[[int, int], None]

_IGNORE = -100  # masked_cross_entropy's ignore_index (ternkit.data.IGNORE_INDEX)


def check_eval_args(batch_size: int, max_tokens: int | None) -> None:
    """Refuse a batch size or token cap below 1 (before anything is loaded)."""
    if batch_size < 1:
        raise TernkitError(f"--batch-size must be at least 1, got {batch_size}; pass the number of windows to score "
                           "per forward, such as 16.")
    if max_tokens is not None and max_tokens < 1:
        raise TernkitError(f"--max-tokens must be at least 1, got {max_tokens}; pass a positive cap on the tokens "
                           "scored, or leave it out to score every token.")


def check_json_path(path: Path) -> None:
    """Refuse a ``--json`` path that cannot be written: its folder missing, or the path itself a folder."""
    if str(path) == "-":
        return
    if path.is_dir():
        raise TernkitError(f"--json {path} is a folder; pass the path of a file to write, such as {path / 'eval.json'}.")
    parent = path.parent
    if not parent.is_dir():
        raise TernkitError(f"--json {path}: the folder {parent} does not exist; create it first or pass a path in an "
                           "existing folder.")


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON to ``path`` through a temporary file and a rename (no half-written file is ever seen)."""
    import json

    from ternkit.tokenizer import write_text_atomic

    try:
        write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise TernkitError(f"cannot write --json {path} ({err.strerror or type(err).__name__}); nothing was written: "
                           "pass a path in a folder you can write to.") from None


def _read_texts(paths: Sequence[Path]) -> list[str]:
    """The UTF-8 text of each ``--data`` file; a TernkitError for a missing, unreadable, non-UTF-8 or empty one."""
    texts = []
    for p in paths:
        name = f"--data file {p}"
        text = read_utf8(Path(p), name, "pass an existing text file you can read.",
                         "pass a UTF-8 text file (re-encode it, e.g. with iconv -t utf-8).")
        if not text:
            raise TernkitError(f"{name} is empty; pass a text file with at least two tokens of text.")
        texts.append(text)
    return texts


def _load(source: Path) -> tuple[nn.Module, Tok, dict[str, Any], dict[str, Any] | None]:
    """(model in eval mode, tokenizer, facts about the source, the checkpoint dict or None for an export).

    A checkpoint keeps its float training layers (not packed), so its numbers are training's own.
    """
    from ternkit.checkpoint import checkpoint_facts, load_checkpoint, model_from_checkpoint
    from ternkit.export import load_model, tokenizer_for

    ckpt: dict[str, Any] | None = None
    if source.is_dir():  # an export folder (load_model says what is wrong with any other folder)
        model, info = load_model(source)
    else:  # loaded here, not through load_model, because the validation split needs the checkpoint dict
        ckpt = load_checkpoint(source)
        model, info = model_from_checkpoint(ckpt, source), checkpoint_facts(ckpt, source)
    tok = tokenizer_for(source, info, model.config.vocab_size, "eval")
    return model.eval(), tok, info, ckpt


# ----------------------------------------------------------------------------------------- batches


#: A batch of token windows scored in one forward: inputs x and targets y, each (B, S) int64.
Batch = tuple[torch.Tensor, torch.Tensor]


def _file_batches(ids_per_file: list[list[int]], tok: Tok, context: int, batch_size: int,
                  max_tokens: int | None) -> tuple[list[Callable[[], Batch]], int, bool]:
    """(batch makers, UTF-8 bytes scored, whether ``max_tokens`` cut the text) for the token ids of each file.

    Window j of a file predicts ids[s+1 : s+T+1] from ids[s : s+T], s = j*T, so every token after the
    first is scored once. Windows of one length share batches (each file's last, shorter one, and
    the one the cap cut); no padding, so every window is scored exactly as the model reads it alone.
    """
    windows: list[tuple[int, int, int]] = []  # (file, start, tokens scored)
    left = max_tokens
    for f, ids in enumerate(ids_per_file):
        for s in range(0, len(ids) - 1, context):
            n = min(context, len(ids) - 1 - s)
            if left is not None:
                if left == 0:
                    break
                n = min(n, left)
                left -= n
            windows.append((f, s, n))
    capped = max_tokens is not None and sum(len(ids) - 1 for ids in ids_per_file) > max_tokens
    scored = [0] * len(ids_per_file)
    for f, _, n in windows:
        scored[f] += n
    # Each file's scored tokens decoded whole: a window edge may split a multi-byte character.
    nbytes = sum(_text_bytes(tok, ids[1 : 1 + k]) for ids, k in zip(ids_per_file, scored) if k)
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        by_len.setdefault(w[2], []).append(w)
    makers: list[Callable[[], Batch]] = []
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            def make(chunk: list[tuple[int, int, int]] = group[i : i + batch_size]) -> Batch:
                block = torch.tensor([ids_per_file[f][s : s + n + 1] for f, s, n in chunk], dtype=torch.long)
                return block[:, :-1], block[:, 1:]

            makers.append(make)  # built when scored: a long file is not held twice as tensors
    return makers, nbytes, capped


def _text_bytes(tok: Tok, ids: Sequence[int] | torch.Tensor, separator_is_one_byte: bool = False) -> int:
    """UTF-8 bytes of the text that token ``ids`` stand for (a byte tokenizer's token is one byte).

    ``separator_is_one_byte``: count each end-of-document token as one byte, as the byte tokenizer's
    separator (the NUL byte) is, instead of the bytes of its name (``<|endoftext|>``, 13): then a
    BPE run and a byte run score the same number of bytes on the same validation documents.
    """
    if isinstance(tok, ByteTokenizer):
        return len(ids)
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    eos = tok.eos_id if separator_is_one_byte else None
    seps = ids.count(eos) if eos is not None else 0
    return len(tok.decode([i for i in ids if i != eos] if seps else ids).encode("utf-8")) + seps


def _training_cwd(folder: Path, run_dir: str | None) -> Path | None:
    """The working directory training ran in, when ``folder`` is the run folder it named ``run_dir`` (relative)."""
    if not run_dir or Path(run_dir).is_absolute():
        return None
    parts = Path(run_dir).parts
    here = folder.resolve()
    if len(here.parts) > len(parts) and here.parts[-len(parts):] == parts:
        return here.parents[len(parts) - 1]
    return None


def _run_folder(source: Path, run_info: dict[str, Any]) -> Path:
    """The run folder (holding recipe.yaml) of a checkpoint: beside it, else run_info's run_dir."""
    candidates = [source.parent]
    if run_info.get("run_dir"):
        candidates.append(Path(run_info["run_dir"]))
    for c in candidates:
        if (c / "recipe.yaml").is_file():
            return c
    where = " or ".join(dict.fromkeys(str(c) for c in candidates))
    raise TernkitError(f"no recipe.yaml found for {source} (looked in {where}), so its validation split cannot be "
                       "rebuilt; pass --data FILE to score a text file instead.")


def _validation_task(source: Path, ckpt: dict[str, Any], run: Path) -> tuple[Any, Any]:
    """(the run's recipe, its text task) as training built them, from the token cache training wrote.

    The checkpoint records the fingerprint of the token cache it was trained on; that cache is read
    as it is (nothing re-tokenized, the corpus need not exist). Without it the task is built again
    from the recipe, and refused if its data differ from the checkpoint's.
    """
    from ternkit.data import TextTask, make_task
    from ternkit.data.cache import open_token_cache
    from ternkit.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    if recipe.data.synthetic:
        raise TernkitError(f"{source} was trained on the synthetic {recipe.data.source} task, which has no text to "
                           "measure in bytes; pass --data FILE to score a text file instead.")
    run_info = ckpt["ternkit"].get("run_info", {})
    caches: list[Path] = []
    if recipe.data.cache_dir:
        given = Path(recipe.data.cache_dir).expanduser()
        base = _training_cwd(run, run_info.get("run_dir"))
        caches += [given] + ([base / given] if base is not None and not given.is_absolute() else [])
    else:
        caches.append(run / "data")
    num_val = recipe.trainer.val_batches * recipe.trainer.batch_size
    fp = (ckpt.get("TernkitDataModule") or {}).get("fingerprint")
    for cache in caches:
        data = open_token_cache(cache, str(fp)) if fp else None
        if data is not None:
            return recipe, TextTask(data, recipe.model.context_length, num_val)
    task = make_task(recipe, caches[-1])
    if fp and task.fingerprint != fp:
        raise TernkitError(f"the data of {run / 'recipe.yaml'} changed since {source} was trained (token cache "
                           f"{task.fingerprint}, not {fp}), so its validation split is not the one training scored; "
                           "pass --data FILE to score a text file instead.")
    return recipe, task


def _validation_batches(source: Path, ckpt: dict[str, Any], tok: Tok,
                        max_tokens: int | None) -> tuple[list[Callable[[], Batch]], int, bool, str]:
    """(batch makers, UTF-8 bytes scored, whether ``max_tokens`` cut it, description) for the run's validation split.

    The same batches training's validation scores: the first ``trainer.val_batches`` batches of
    ``trainer.batch_size`` windows of the validation set, in order (``val_dataloader`` under
    ``limit_val_batches``).
    """
    from torch.utils.data import DataLoader

    run = _run_folder(source, ckpt["ternkit"].get("run_info", {}))
    recipe, task = _validation_task(source, ckpt, run)
    loader = DataLoader(task.val_set(), batch_size=recipe.trainer.batch_size, shuffle=False)
    batches: list[Batch] = []
    left = max_tokens
    capped = False
    for i, (x, y) in enumerate(loader):
        if i >= recipe.trainer.val_batches:
            break
        if left == 0:
            capped = True
            break
        if left is not None and y.numel() > left:
            capped = True
            full, part = divmod(left, y.shape[1])
            if full:
                batches.append((x[:full], y[:full]))
            if part:  # the model is causal: a window's first positions score as they do in the whole window
                batches.append((x[full : full + 1, :part], y[full : full + 1, :part]))
            break
        batches.append((x, y))
        if left is not None:
            left -= y.numel()
    nbytes = sum(_text_bytes(tok, row, separator_is_one_byte=True) for _, y in batches for row in y)
    makers = [(lambda b=b: b) for b in batches]
    return makers, nbytes, capped, f"validation split of {run}"


# ----------------------------------------------------------------------------------------- scoring


def _score(model: nn.Module, makers: list[Callable[[], Batch]], progress: Progress | None) -> tuple[float, int]:
    """(total nats, tokens scored) over the batches: each batch's masked mean loss times its scored tokens."""
    from ternkit.train.module import masked_cross_entropy

    nats = 0.0
    tokens = 0
    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.inference_mode():
        for k, make in enumerate(makers):
            x, y = make()
            y = y.to(device)
            n = int((y != _IGNORE).sum())
            nats += float(masked_cross_entropy(model(x.to(device)), y, ignore_index=_IGNORE)) * n
            tokens += n
            if progress is not None:
                progress(k + 1, len(makers))
    return nats, tokens


def evaluate(source: str | os.PathLike[str], data: Sequence[str | os.PathLike[str]] | None = None,
             batch_size: int = 16, max_tokens: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Loss (nats/token), perplexity and bits per byte of the model in ``source`` on ``data`` files or its validation split.

    ``source``: a checkpoint (scored with its float training layers, as training validated it) or an
    export folder (its packed layers). ``data``: text files, each scored in non-overlapping windows
    of the model's context length, ``batch_size`` windows per forward; without them a checkpoint's
    own validation split is scored batch for batch as training did (in its trainer.batch_size), so
    the loss is the run's val/loss. ``max_tokens`` caps the tokens scored. ``progress(done, total)``
    is called after every batch. Returns a JSON-able dict of the facts.
    """
    check_eval_args(batch_size, max_tokens)
    source = Path(source)
    paths = [Path(p) for p in data or []]
    texts = _read_texts(paths)  # every file checked before the model is loaded
    model, tok, info, ckpt = _load(source)
    context = int(model.config.context_length)
    if paths:
        ids_per_file = []
        for p, text in zip(paths, texts):
            ids = tok.encode(text)
            if len(ids) < 2:
                raise TernkitError(f"--data file {p} encodes to {len(ids)} token{'s' * (len(ids) != 1)}, but scoring "
                                   "needs at least 2 (one to read, one to predict); pass a longer text.")
            ids_per_file.append(ids)
        makers, nbytes, capped = _file_batches(ids_per_file, tok, context, batch_size, max_tokens)
        described: Any = [str(p) for p in paths]
    elif ckpt is None:
        raise TernkitError(f"{source} is an export folder, which does not record the run it came from, so it has no "
                           "validation split to score; pass --data FILE to score a text file.")
    else:
        makers, nbytes, capped, described = _validation_batches(source, ckpt, tok, max_tokens)
    nats, tokens = _score(model, makers, progress)
    loss = nats / max(tokens, 1)
    return {
        "source": str(source), "kind": info["kind"], "global_step": info.get("global_step"), "data": described,
        "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,  # exp overflows a float past ~709
        "bits_per_byte": nats / math.log(2) / nbytes if nbytes else None,
        "tokens": tokens, "bytes": nbytes, "batches": len(makers), "context_length": context,
        "tokenizer": getattr(tok, "kind", type(tok).__name__), "max_tokens": max_tokens, "capped": capped,
    }
