"""``ternkit generate SOURCE PROMPT``: constant-memory decoding (prefill, then one step per token), streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ternkit.cli.app import app, console, err_console, user_errors


@app.command("generate")
@user_errors
def generate_cmd(
    source: Path = typer.Argument(..., help="A checkpoint (.ckpt) or an export folder (ternkit export --packed)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(128, "-n", "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature (finite, >= 0); 0 means greedy "
                                      "(the most likely token every step)."),
    top_k: Optional[int] = typer.Option(40, "--top-k", help="Sample among the k most likely tokens (k >= 1)."),
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
    from ternkit.generate import check_sampling, load_for_generation, stream_text

    if max_new_tokens < 1:
        raise TernkitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    greedy = check_sampling(temperature, top_k)  # before the model loads: a typo costs nothing
    model, tok = load_for_generation(source, packed=not float_layers)
    ids = tok.encode(prompt)
    if not ids:
        raise TernkitError("the prompt encodes to no tokens; pass a non-empty prompt.")
    g = torch.Generator().manual_seed(seed)
    stats = stream_text(model, tok.decode, ids, max_new_tokens, greedy=greedy,
                        temperature=max(temperature, 1e-6), top_k=top_k, generator=g, write=_write_out)
    # Timings go to stderr so that stdout carries exactly the text (pipes, tests).
    err_console.print(f"prefill: {stats['prompt_tokens']} tokens, {stats['prefill_tps']:.1f} tok/s; decode: "
                      f"{stats['decode_tokens']} tokens, {stats['decode_tps']:.1f} tok/s", highlight=False)


def _write_out(piece: str) -> None:
    out = console.file
    out.write(piece)
    out.flush()
