"""Text generation from a checkpoint or an export: load the model with its tokenizer, stream decoded text."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ternkit.errors import TernkitError
from ternkit.tokenizer import Tok

__all__ = ["check_sampling", "load_for_generation", "stream_text"]


def check_sampling(temperature: float, top_k: int | None) -> bool:
    """Validate sampling settings before a model is loaded; returns whether decoding is greedy (temperature 0).

    ``temperature`` must be finite and >= 0 (0 means greedy: the most likely token every step);
    ``top_k`` must be None (every token) or at least 1. A negative temperature used to fall back
    to greedy silently and nan/inf broke sampling half-way, so both are refused up front.
    """
    if not math.isfinite(temperature):
        raise TernkitError(f"--temperature must be a finite number, got {temperature}; use 0 for greedy decoding or "
                           "a positive value such as 0.8.")
    if temperature < 0:
        raise TernkitError(f"--temperature must not be negative, got {temperature:g}; use 0 for greedy decoding or a "
                           "positive value such as 0.8.")
    if top_k is not None and top_k < 1:
        raise TernkitError(f"--top-k must be at least 1, got {top_k}; pass the number of most likely tokens to sample "
                           "among, such as 40.")
    return temperature == 0


def load_for_generation(source: str | Path, packed: bool = True) -> tuple[nn.Module, Tok]:
    """(model in eval mode, its tokenizer) from a checkpoint or an export folder.

    ``packed`` packs a checkpoint's ternary layers to 2 bits in memory so decoding runs the
    compiled ops, as an export does; ``packed=False`` keeps the float training layers.
    """
    from ternkit.export import load_model, pack_model, tokenizer_for

    source = Path(source)
    model, info = load_model(source)
    tok = tokenizer_for(source, info, model.config.vocab_size, "generate")
    if info["kind"] == "checkpoint" and packed:
        pack_model(model, "2bit")
    return model, tok


def stream_text(model: Any, decode: Callable[[list[int]], str], ids: list[int], max_new_tokens: int,
                write: Callable[[str], None], **sampling: Any) -> dict[str, Any]:
    """Decode ``max_new_tokens`` after the prompt ``ids`` with ``model.stream``, handing ``write`` the text as it grows.

    ``write`` first receives the prompt's text, then each new piece of ``decode(prompt + new)``
    once it is final (a piece ending in an incomplete UTF-8 sequence, decoded as U+FFFD, waits
    for the next token), and a final newline, so the pieces join to exactly the whole decoded
    text. Returns token counts and tokens/s: prefill (prompt tokens over the time to the first
    new token) and decode (the later tokens over their steps); time spent in ``write`` is not counted.
    """
    all_ids = list(ids)
    shown = decode(all_ids)
    write(shown)
    it = model.stream(torch.tensor([ids]), max_new_tokens, **sampling)
    t_prefill = t_decode = 0.0
    n = 0
    while True:
        t0 = time.perf_counter()
        with torch.no_grad():
            nxt = next(it, None)
        dt = time.perf_counter() - t0
        if nxt is None:
            break
        if n == 0:
            t_prefill = dt
        else:
            t_decode += dt
        n += 1
        all_ids.append(int(nxt[0]))
        text = decode(all_ids)
        if text.startswith(shown) and not text.endswith("\ufffd"):
            write(text[len(shown):])
            shown = text
    text = decode(all_ids)
    # A decoder may rewrite earlier text once later tokens arrive; only the untouched prefix was shown.
    write((text[len(shown):] if text.startswith(shown) else "") + "\n")
    steps = max(n - 1, 0)
    return {"prompt_tokens": len(ids), "new_tokens": n, "decode_tokens": steps,
            "prefill_s": t_prefill, "decode_s": t_decode,
            "prefill_tps": len(ids) / t_prefill if t_prefill > 0 else float("nan"),
            "decode_tps": steps / t_decode if t_decode > 0 else float("nan")}
