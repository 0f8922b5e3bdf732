"""One test per bad input: each ends in exit code 2 with one sentence (no traceback) and damages nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_sentence_error, sets, snapshot, toy_text_sets


@pytest.fixture
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _nothing_written(tmp: Path) -> None:
    assert not (tmp / "runs").exists(), list((tmp / "runs").rglob("*"))


def test_recipe_typo_says_did_you_mean(cli, in_tmp: Path) -> None:
    msg = assert_one_sentence_error(cli(["train", "mlstm_stc", "--set", "trainer.max_step=5"]))
    assert "trainer.max_step" in msg and "did you mean 'trainer.max_steps'" in msg
    bad = in_tmp / "typo.yaml"
    bad.write_text("trainer:\n  max_step: 5\n")
    msg = assert_one_sentence_error(cli(["train", str(bad)]))
    assert "did you mean 'trainer.max_steps'" in msg
    _nothing_written(in_tmp)


def test_wrong_type_names_key_and_type(cli, in_tmp: Path) -> None:
    msg = assert_one_sentence_error(cli(["train", "mlstm_stc", "--set", "trainer.max_steps=abc"]))
    assert "trainer.max_steps" in msg and "integer" in msg and "abc" in msg
    _nothing_written(in_tmp)


def test_missing_recipe_file(cli, in_tmp: Path) -> None:
    msg = assert_one_sentence_error(cli(["train", "no/such/recipe.yaml"]))
    assert "no/such/recipe.yaml" in msg and "not found" in msg
    msg = assert_one_sentence_error(cli(["train", "mlstm_sct"]))
    assert "did you mean 'mlstm_stc'" in msg


def test_missing_data_file(cli, in_tmp: Path, token_cache: Path) -> None:
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache)
              + sets("data.source=files", "data.paths=[missing.txt]"))
    msg = assert_one_sentence_error(res)
    assert "missing.txt" in msg and "not found" in msg
    assert not list(in_tmp.rglob("*.ckpt"))


def test_empty_corpus(cli, in_tmp: Path, token_cache: Path) -> None:
    (in_tmp / "empty.txt").write_text("")
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache)
              + sets("data.source=files", "data.paths=[empty.txt]"))
    msg = assert_one_sentence_error(res)
    assert "no text" in msg or "empty" in msg
    assert not list(in_tmp.rglob("*.ckpt"))
    assert (in_tmp / "empty.txt").read_text() == ""


@pytest.mark.parametrize("verb", ["stats", "export", "resume"])
@pytest.mark.parametrize("kind", ["not_ternkit", "truncated", "random_bytes", "missing"])
def test_bad_checkpoints(kind: str, verb: str, cli, in_tmp: Path, toy_run: Path, token_cache: Path) -> None:
    path = in_tmp / "bad.ckpt"
    if kind == "not_ternkit":
        torch.save({"a": 1}, path)
    elif kind == "truncated":
        data = (toy_run / "last.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    before = snapshot([path])
    if verb == "stats":
        argv = ["stats", str(path), "--deadzone"]
    elif verb == "export":
        argv = ["export", str(path), "--packed", "-o", str(in_tmp / "out")]
    else:
        argv = ["train", "mlstm_stc", "--no-progress", "--resume", str(path)] + toy_text_sets(token_cache)
    msg = assert_one_sentence_error(cli(argv))
    assert "bad.ckpt" in msg
    expected = {"not_ternkit": "not a ternkit checkpoint", "truncated": "truncated", "random_bytes": "truncated",
                "missing": "no such checkpoint" if verb == "resume" else "does not exist"}[kind]
    assert expected in msg
    assert snapshot([path]) == before
    assert not (in_tmp / "out").exists()
    assert not list(in_tmp.rglob("last.ckpt"))


def test_export_dir_exists_refused_without_force(cli, in_tmp: Path, toy_run: Path) -> None:
    out = in_tmp / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = assert_one_sentence_error(cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(out)]))
    assert "--force" in msg and "exp" in msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    res = cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(out), "--force"])
    assert res.code == 0, res.text
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "mine"


def _bpe_tokenizer(path: Path) -> Path:
    """A small BPE tokenizer.json (vocab > 256) that does not fit a byte-level model."""
    from ternkit.tokenizer import train_bpe

    text = ["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50, "import os, sys\n" * 50]
    tok = train_bpe(text, vocab_size=300, min_frequency=1)
    assert tok.vocab_size > 256
    path.mkdir(parents=True, exist_ok=True)
    return tok.save(path)


def test_resume_with_other_tokenizer_is_refused_and_run_untouched(cli, in_tmp: Path, toy_run: Path) -> None:
    run = in_tmp / "copy"
    shutil.copytree(toy_run, run)
    before = snapshot([run / "last.ckpt", run / "tokenizer.json", run / "recipe.yaml", run / "summary.json"])
    tok = _bpe_tokenizer(in_tmp / "bpe")
    res = cli(["train", str(run / "recipe.yaml"), "--no-progress", "--resume", "auto"]
              + sets(f"checkpoint.dir={run}", "tokenizer.kind=file", f"tokenizer.path={tok}",
                     "trainer.max_steps=14"))
    msg = assert_one_sentence_error(res)
    assert "vocabulary (256)" in msg and "tokenizer" in msg
    assert snapshot(list(before)) == before


def test_export_with_mismatched_tokenizer_is_refused(cli, in_tmp: Path, toy_run: Path) -> None:
    other = in_tmp / "other"
    other.mkdir()
    shutil.copyfile(toy_run / "last.ckpt", other / "last.ckpt")
    _bpe_tokenizer(other)
    msg = assert_one_sentence_error(cli(["export", str(other / "last.ckpt"), "--packed", "-o", str(in_tmp / "out")]))
    assert "tokenizer.json" in msg and "256" in msg
    assert not (in_tmp / "out").exists()


def test_resume_missing_path(cli, in_tmp: Path) -> None:
    msg = assert_one_sentence_error(cli(["train", "mlstm_stc", "--resume", "nowhere/last.ckpt"]))
    assert "nowhere/last.ckpt" in msg and "--resume auto" in msg
    _nothing_written(in_tmp)


def test_resume_with_other_model_shape_is_refused(cli, in_tmp: Path, toy_run: Path) -> None:
    run = in_tmp / "copy"
    shutil.copytree(toy_run, run)
    before = snapshot([run / "last.ckpt", run / "tokenizer.json", run / "recipe.yaml", run / "summary.json"])
    res = cli(["train", str(run / "recipe.yaml"), "--no-progress", "--resume", "auto"]
              + sets(f"checkpoint.dir={run}", "model.d_model=64", "trainer.max_steps=14"))
    msg = assert_one_sentence_error(res)
    assert "d_model=32 vs 64" in msg and "recipe.yaml" in msg
    assert snapshot(list(before)) == before
