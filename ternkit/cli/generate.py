"""``ternkit generate SOURCE PROMPT``: constant-memory decoding (prefill, then one step per token)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ternkit.cli.app import app, console, user_errors


@app.command("generate")
@user_errors
def generate_cmd(
    source: Path = typer.Argument(..., help="A checkpoint (.ckpt) or an export folder (ternkit export --packed)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(128, "-n", "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 means greedy."),
    top_k: Optional[int] = typer.Option(40, "--top-k", help="Sample among the k most likely tokens."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (the same seed gives the same text)."),
) -> None:
    """Continue PROMPT with a trained model, decoding token by token with a constant-size state."""
    import torch

    from ternkit.errors import TernkitError
    from ternkit.export import find_tokenizer, load_model
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
    ids = tok.encode(prompt)
    if not ids:
        raise TernkitError("the prompt encodes to no tokens; pass a non-empty prompt.")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens, greedy=temperature <= 0,
                             temperature=max(temperature, 1e-6), top_k=top_k, generator=g)
    console.print(tok.decode(out[0].tolist()), markup=False, highlight=False, soft_wrap=True)
