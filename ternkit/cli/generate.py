"""``ternkit generate SOURCE PROMPT``: constant-memory decoding (prefill, then one step per token), streamed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ternkit.cli.app import app, console, err_console, user_errors


@app.command("generate")
@user_errors
def generate_cmd(
    source: Path = typer.Argument(..., help="A checkpoint (.ckpt) or an export folder (ternkit export --packed)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(128, "-n", "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 means greedy."),
    top_k: Optional[int] = typer.Option(40, "--top-k", help="Sample among the k most likely tokens."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (the same seed gives the same text)."),
    float_layers: bool = typer.Option(False, "--float", help="Decode a checkpoint with its float ternarized layers "
                                      "(the training forward) instead of packing them for the compiled ops."),
) -> None:
    """Continue PROMPT with a trained model, decoding token by token with a constant-size state.

    Ternary projections run the ternary_linear op on 2-bit packed trits (a checkpoint is packed
    in memory first, unless --float) and STC memories are written in place by stc_write.
    """
    import torch

    from ternkit.errors import TernkitError
    from ternkit.export import find_tokenizer, load_model, pack_model
    from ternkit.train.tokenizer import load_tokenizer

    if max_new_tokens < 1:
        raise TernkitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    model, info = load_model(source)
    tok_path = find_tokenizer(source, info.get("run_info", {}))
    if tok_path is None or not tok_path.exists():
        raise TernkitError(f"no tokenizer.json found for {source} (synthetic-task models have none); generate needs a "
                           "text model trained with a tokenizer.")
    tok = load_tokenizer(tok_path)
    if int(tok.vocab_size) > int(model.config.vocab_size):
        raise TernkitError(f"{tok_path} has {tok.vocab_size} tokens but the model knows {model.config.vocab_size}; "
                           "use the tokenizer the model was trained with.")
    if info["kind"] == "checkpoint" and not float_layers:
        pack_model(model, "2bit")
    ids = tok.encode(prompt)
    if not ids:
        raise TernkitError("the prompt encodes to no tokens; pass a non-empty prompt.")
    g = torch.Generator().manual_seed(seed)
    stats = stream_text(model, tok.decode, ids, max_new_tokens, greedy=temperature <= 0,
                        temperature=max(temperature, 1e-6), top_k=top_k, generator=g, write=_write_out)
    # Timings go to stderr so that stdout carries exactly the text (pipes, tests).
    err_console.print(f"prefill: {stats['prompt_tokens']} tokens, {stats['prefill_tps']:.1f} tok/s; decode: "
                      f"{stats['decode_tokens']} tokens, {stats['decode_tps']:.1f} tok/s", highlight=False)


def _write_out(piece: str) -> None:
    out = console.file
    out.write(piece)
    out.flush()


def stream_text(model: Any, decode: Callable[[list[int]], str], ids: list[int], max_new_tokens: int,
                write: Callable[[str], None], **sampling: Any) -> dict[str, Any]:
    """Decode ``max_new_tokens`` after the prompt ``ids`` with ``model.stream``, handing ``write`` the text as it grows.

    ``write`` first receives the prompt's text, then each new piece of ``decode(prompt + new)``
    once it is final (a piece ending in an incomplete UTF-8 sequence, decoded as U+FFFD, waits
    for the next token), and a final newline, so the pieces join to exactly the whole decoded
    text. Returns token counts and tokens/s: prefill (prompt tokens over the time to the first
    new token) and decode (the later tokens over their steps); time spent in ``write`` is not counted.
    """
    import torch

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
