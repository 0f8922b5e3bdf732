"""``ternkit generate``: decoding from a checkpoint and from its packed export gives the same text."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import assert_one_sentence_error


def test_generate_same_text_from_checkpoint_and_export(cli, toy_run: Path, tmp_path: Path) -> None:
    ckpt = toy_run / "last.ckpt"
    out = tmp_path / "export"
    assert cli(["export", str(ckpt), "--packed", "-o", str(out)]).code == 0
    a = cli(["generate", str(ckpt), "def ", "-n", "24", "--seed", "3"])
    b = cli(["generate", str(out), "def ", "-n", "24", "--seed", "3"])
    assert a.code == 0 and b.code == 0, a.text + b.text
    assert a.out.startswith("def ") and a.out == b.out
    # Greedy decoding equals the argmax of the model's own greedy generate on the same prompt.
    from ternkit.export import load_model
    from ternkit.tokenizer import load_tokenizer

    model, _ = load_model(ckpt)
    tok = load_tokenizer(toy_run / "tokenizer.json")
    ids = torch.tensor([tok.encode("def ")])
    expect = tok.decode(model.generate(ids, 16, greedy=True)[0].tolist())
    # The CLI packs the checkpoint (ternary_linear + stc_write); --float keeps the training layers.
    g = cli(["generate", str(ckpt), "def ", "-n", "16", "--temperature", "0"])
    assert g.code == 0 and g.out.rstrip("\n") == expect
    f = cli(["generate", str(ckpt), "def ", "-n", "16", "--temperature", "0", "--float"])
    assert f.code == 0 and f.out == g.out


def test_generate_bad_inputs_exit_2(cli, toy_run: Path, tmp_path: Path) -> None:
    assert_one_sentence_error(cli(["generate", str(tmp_path / "missing.ckpt"), "x"]))
    assert_one_sentence_error(cli(["generate", str(toy_run / "last.ckpt"), "x", "-n", "0"]))
