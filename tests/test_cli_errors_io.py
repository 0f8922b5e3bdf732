"""Disk and file failures, one test each: exit code 2, one sentence naming the problem and the fix, no traceback,
every file that existed before left byte-for-byte as it was, and nothing half-written left behind."""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_sentence_error, sets, snapshot, toy_text_sets

_ENOSPC = os.strerror(errno.ENOSPC)


@pytest.fixture
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def all_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, hidden ones included."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def tmp_files(folder: Path) -> list[Path]:
    """The temporary files a write leaves under ``folder`` when it is not cleaned up."""
    return [p for p in all_files(folder) if p.name.endswith(".tmp")]


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ------------------------------------------------------------------------------------------ checkpoints


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(cli, in_tmp: Path, token_cache: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import ternkit.train.callbacks as callbacks

    run = in_tmp / "runs" / "full"
    real_save = torch.save
    state = {"calls": 0, "fail_from": 2}

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        state["calls"] += 1
        if state["calls"] >= state["fail_from"]:
            f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]  # what a full disk leaves
            raise OSError(errno.ENOSPC, _ENOSPC)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(callbacks.torch, "save", save)
    argv = (["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache, 6)
            + sets("name=full", f"checkpoint.dir={run}", "checkpoint.every_steps=2", "trainer.val_every=6"))
    # Step 2's last.ckpt is written (and promoted at step 3); the disk is full when step 4's is written.
    msg = assert_one_sentence_error(cli(argv))
    assert f"could not write checkpoint {run / 'last.ckpt'} at step 4 ({_ENOSPC})" in msg
    assert f"the previous checkpoint {run / 'last.ckpt'} (step 2) is intact" in msg
    assert "free some disk space" in msg and f"ternkit train {run / 'recipe.yaml'} --resume auto" in msg
    assert tmp_files(run) == [] and _step(run / "last.ckpt") == 2

    # Resuming while the disk is still full: the same sentence, the checkpoint kept byte for byte.
    kept = snapshot([run / "last.ckpt", run / "tokenizer.json"])
    state.update(calls=0, fail_from=1)
    msg = assert_one_sentence_error(cli(argv + ["--resume", "auto"]))
    assert "(step 2) is intact" in msg and "--resume auto" in msg
    assert snapshot(list(kept)) == kept and tmp_files(run) == []

    # Space freed: the advice works.
    monkeypatch.setattr(callbacks.torch, "save", real_save)
    res = cli(argv + ["--resume", "auto"])
    assert res.code == 0, res.text
    assert _step(run / "last.ckpt") == 6 and tmp_files(run) == []


def test_first_checkpoint_failing_says_none_was_kept(cli, in_tmp: Path, token_cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import ternkit.train.callbacks as callbacks

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, _ENOSPC)

    monkeypatch.setattr(callbacks.torch, "save", save)
    run = in_tmp / "runs" / "none"
    msg = assert_one_sentence_error(cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache, 2)
                                        + sets("name=none", f"checkpoint.dir={run}")))
    assert "could not write checkpoint" in msg and "before any checkpoint was kept" in msg
    assert "free some disk space" in msg and "--resume auto" in msg
    assert list(run.glob("*.ckpt")) == [] and tmp_files(run) == []


@pytest.mark.parametrize("broken", ["last.ckpt", "alone"])
def test_unreadable_checkpoint_names_checkpoints_that_exist(broken: str, cli, in_tmp: Path, toy_run: Path) -> None:
    run = in_tmp / "run"
    shutil.copytree(toy_run, run)
    shutil.copyfile(run / "best.ckpt", run / "step0000006.ckpt")
    if broken == "alone":
        (in_tmp / "alone").mkdir()
        path = in_tmp / "alone" / "last.ckpt"
    else:
        path = run / "last.ckpt"
    data = (toy_run / "last.ckpt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (run / "step0000002.ckpt").write_bytes(data[:100])  # broken too: never offered
    before = snapshot(all_files(in_tmp))
    for argv in (["stats", str(path)], ["export", str(path), "--packed", "-o", str(in_tmp / "out")]):
        msg = assert_one_sentence_error(cli(argv))
        assert str(path) in msg and "truncated" in msg
        if broken == "alone":
            assert "no other checkpoint exists beside it" in msg and "such as" not in msg
        else:
            # The broken last.ckpt is never offered as the way out; the ones beside it are, in order.
            assert f"use another checkpoint such as {run / 'best.ckpt'} or {run / 'step0000006.ckpt'}" in msg
            assert "such as last.ckpt" not in msg and "step0000002" not in msg
    assert snapshot(all_files(in_tmp)) == before and not (in_tmp / "out").exists()


def test_state_dict_mismatch_names_the_tensors(cli, in_tmp: Path, toy_run: Path) -> None:
    ckpt = torch.load(toy_run / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    model_keys = [k for k in sd if k.startswith("model.")]
    floats = [k for k in model_keys if sd[k].is_floating_point() and sd[k].dim() == 2]
    for k in model_keys[:5]:
        del sd[k]  # five missing: three named, "2 more"
    sd["model.stray.weight"] = torch.zeros(3)
    reshaped = floats[-1]
    assert reshaped not in model_keys[:5]
    sd[reshaped] = torch.zeros(7, 5)
    path = in_tmp / "edited.ckpt"
    torch.save(ckpt, path)
    before = snapshot([path])
    msg = assert_one_sentence_error(cli(["stats", str(path)]))
    names = [k.removeprefix("model.") for k in model_keys[:3]]
    assert "edited.ckpt does not match its own model config" in msg
    assert f"5 tensors missing ({', '.join(names)}, ... 2 more)" in msg
    assert "1 unexpected (stray.weight)" in msg
    assert f"1 with the wrong shape ({reshaped.removeprefix('model.')} (7, 5) in the checkpoint vs" in msg
    assert "incompatible ternkit version" in msg and "no other checkpoint exists beside it" in msg
    assert snapshot([path]) == before


# ------------------------------------------------------------------------------------------ token cache


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after a few bytes."""

    def write(self, b: object) -> int:
        super().write(bytes(memoryview(b))[:10])  # type: ignore[arg-type]
        raise OSError(errno.ENOSPC, _ENOSPC)


def test_full_disk_while_writing_the_token_cache(cli, in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ternkit.data.cache as cache

    cache_dir = in_tmp / "cache"
    base = ["train", "mlstm_stc", "--no-progress", "--dry-run"] + toy_text_sets(cache_dir)
    assert cli(base).code == 0  # an earlier, complete cache of another corpus size
    before = snapshot(all_files(in_tmp))
    old = set((cache_dir / "tokens").iterdir())

    def full_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "val.bin" in str(file) and "w" in mode:  # train.bin fits, the disk fills during val.bin
            return _FullDisk(file, "wb")  # type: ignore[arg-type]
        return open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(cache, "open", full_open, raising=False)
    argv = base + sets("data.max_chars=50000")
    msg = assert_one_sentence_error(cli(argv))
    assert "could not write the token cache" in msg and _ENOSPC in msg
    assert "free some disk space" in msg and "data.cache_dir" in msg and "run again" in msg
    assert snapshot(list(before)) == before
    # Nothing half-written stays, least of all something that looks like a finished cache.
    assert set((cache_dir / "tokens").iterdir()) == old and tmp_files(cache_dir) == []

    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    assert cli(argv).code == 0
    (new,) = set((cache_dir / "tokens").iterdir()) - old
    meta = cache._cached(new)
    assert meta is not None and meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    assert snapshot(list(before)) == before


# ------------------------------------------------------------------------------------------ data files


@pytest.mark.parametrize("name, content, where", [
    ("latin.txt", "def f():\n    return 'café'\n".encode("latin-1"), "byte 24, 0xe9, on line 2"),
    ("image.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "byte 0, 0x89, on line 1"),
], ids=["latin-1", "binary"])
def test_data_file_not_utf8_names_the_byte(name: str, content: bytes, where: str, cli, in_tmp: Path) -> None:
    (in_tmp / "good.txt").write_text("def g():\n    return 1\n" * 50)
    (in_tmp / name).write_bytes(content)
    before = snapshot(all_files(in_tmp))
    res = cli(["train", "mlstm_stc", "--no-progress", "--dry-run"] + toy_text_sets(in_tmp / "cache")
              + sets("data.source=files", f"data.paths=[good.txt, {name}]"))
    msg = assert_one_sentence_error(res)
    assert f"data file '{name}' is not UTF-8 text ({where})" in msg
    assert "convert it to UTF-8" in msg and "iconv" in msg and "drop it from data.paths" in msg
    assert "DatasetGenerationError" not in msg
    assert snapshot(list(before)) == before
    assert not (in_tmp / "runs").exists() or not list((in_tmp / "runs").rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------ --set overrides


@pytest.mark.parametrize("items, named, also", [
    (["model.d_model=130", "model.n_heads=4"], ["model.d_model=130", "model.n_heads=4"], None),
    (["model.n_heads=4", "model.chunk_size=32", "model.d_model=130"], ["model.n_heads=4", "model.d_model=130"], None),
    (["model.d_model=130"], ["model.d_model=130"], "with model.n_heads from"),
    (["model.moe.experts=4", "model.moe.top_k=9"], ["model.moe.experts=4", "model.moe.top_k=9"], None),
    (["optimizer.name=muon", "optimizer.ternary_lr_scale=2"], ["optimizer.name=muon", "optimizer.ternary_lr_scale=2"],
     None),
], ids=["divisible", "unrelated-set-left-out", "one-set-one-file-key", "moe-top-k", "optimizer"])
def test_interacting_set_overrides_are_both_named(items: list[str], named: list[str], also: str | None, cli,
                                                  in_tmp: Path) -> None:
    msg = assert_one_sentence_error(cli(["train", "mlstm_stc", "--print-config"] + sets(*items)))
    assert " and ".join(f"--set {n}" for n in named) in msg.split(": ")[0], msg
    if also:
        assert also in msg
    assert "model.chunk_size" not in msg
    assert not (in_tmp / "runs").exists()


def test_cross_key_error_from_the_file_blames_the_file(cli, in_tmp: Path) -> None:
    bad = in_tmp / "odd.yaml"
    bad.write_text("model:\n  d_model: 130\n  n_heads: 4\n")
    before = snapshot([bad])
    msg = assert_one_sentence_error(cli(["train", str(bad), "--print-config"] + sets("model.chunk_size=32")))
    assert msg.startswith(f"{bad}: model.d_model (130) must be divisible by model.n_heads (4)"), msg
    assert "--set" not in msg
    assert snapshot([bad]) == before
