"""More bad inputs, one test each: exit code 2, one sentence naming the problem and the fix, no traceback, and
every file that existed before left byte-for-byte as it was (recipes, run folders, exports)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CliResult, assert_one_sentence_error, run_cli_subprocess, sets, snapshot, toy_text_sets


@pytest.fixture
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def toy_export(toy_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy checkpoint exported once (base3), through the Python API the CLI calls."""
    from ternkit.export import export_packed

    out = tmp_path_factory.mktemp("more_export") / "export"
    export_packed(toy_run / "last.ckpt", out)
    return out


def only_error(res: CliResult) -> str:
    """Like assert_one_sentence_error, and stderr holds nothing but that sentence (no warning lines before it)."""
    msg = assert_one_sentence_error(res)
    assert res.err.strip().splitlines() == [f"error: {msg}"], res.err
    return msg


def all_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (for snapshots of whole folders)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def listing(folder: Path) -> list[str]:
    """Every path under ``folder``, relative, files and folders (to prove nothing was added)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _no_runs(tmp: Path) -> None:
    assert not (tmp / "runs").exists(), listing(tmp / "runs")


# ------------------------------------------------------------------------------------------- recipes


def test_recipe_not_utf8_names_the_byte(cli, in_tmp: Path) -> None:
    bad = in_tmp / "latin.yaml"
    bad.write_bytes("name: café\nseed: 1\n".encode("latin-1"))
    before = snapshot([bad])
    msg = only_error(cli(["train", str(bad), "--dry-run"]))
    assert "latin.yaml" in msg and "not UTF-8 text (byte 9" in msg and "0xe9" in msg and "save it as UTF-8" in msg
    assert snapshot([bad]) == before
    _no_runs(in_tmp)


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but comments\n# and more\n"], ids=["0-bytes", "blank", "comments"])
def test_empty_recipe_is_refused(text: str, cli, in_tmp: Path) -> None:
    bad = in_tmp / "empty.yaml"
    bad.write_text(text)
    msg = only_error(cli(["train", str(bad), "--print-config"]))
    assert "empty.yaml" in msg and "is empty" in msg and "ternkit recipes copy mlstm_stc my.yaml" in msg
    assert bad.read_text() == text
    _no_runs(in_tmp)


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!python/object/apply:os.system", "!shell"])
def test_yaml_python_tag_is_unsafe_not_indentation(tag: str, cli, in_tmp: Path) -> None:
    bad = in_tmp / "evil.yaml"
    bad.write_text(f"seed: {tag} [echo hi]\n")
    msg = only_error(cli(["train", str(bad), "--print-config"]))
    assert f"'{tag}'" in msg and "unsafe or unsupported" in msg and "line 1" in msg and "remove the tag" in msg
    assert "indentation" not in msg


def test_recipe_control_character_is_named(cli, in_tmp: Path) -> None:
    bad = in_tmp / "nul.yaml"
    bad.write_bytes(b"name: a\x00b\n")
    msg = only_error(cli(["train", str(bad), "--print-config"]))
    assert "control character 0x00" in msg and "indentation" not in msg


@pytest.mark.parametrize("how, name, expect", [
    ("set", "x" * 300, "300 characters (300 bytes in UTF-8) long"),
    ("set", "é" * 120, "120 characters (240 bytes in UTF-8) long"),
    ("yaml", '"a\\0b"', "control character"),
    ("yaml", '"tab\\there"', "control character"),
    ("set", "a/b", "plain folder name"),
    ("set", "a\\b", "plain folder name"),
    ("set", "..", "plain folder name"),
], ids=["300-chars", "240-bytes", "nul", "tab", "slash", "backslash", "dotdot"])
def test_bad_run_name_refused_by_schema(how: str, name: str, expect: str, cli, in_tmp: Path) -> None:
    if how == "set":
        argv = ["train", "mlstm_stc", "--print-config", "--set", f"name={name}"]
    else:
        (in_tmp / "named.yaml").write_text(f"name: {name}\n")
        argv = ["train", str(in_tmp / "named.yaml"), "--print-config"]
    msg = only_error(cli(argv))
    assert expect in msg and "name" in msg
    _no_runs(in_tmp)


def test_run_name_of_128_characters_is_fine() -> None:
    from ternkit.recipe import MAX_NAME_CHARS, recipe_from_dict

    assert recipe_from_dict({"name": "n" * MAX_NAME_CHARS}).name == "n" * MAX_NAME_CHARS


@pytest.mark.parametrize("item", ["optimizer.lr=.inf", "optimizer.lr=.nan", "optimizer.lr=-.inf",
                                  "optimizer.betas=[.nan,0.95]", "model.forget_bias_init=[-.inf,1.0]",
                                  "trainer.grad_clip=.inf", "data.val_fraction=.nan", "model.moe.jitter=.nan",
                                  "model.gate_soft_cap=.inf", "trainer.divergence_factor=.inf"])
def test_non_finite_float_is_refused(item: str, cli, in_tmp: Path) -> None:
    msg = only_error(cli(["train", "mlstm_stc", "--print-config", "--set", item]))
    key = item.split("=")[0]
    assert f"'{key}' must be a finite number" in msg and f"--set {item}" in msg


def test_every_section_refuses_inf_and_nan() -> None:
    from ternkit.recipe import Recipe
    from ternkit.schema import model_in

    seen = set()
    todo = [Recipe]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        assert cls.model_config.get("allow_inf_nan") is False, cls.__name__
        todo += [sub for f in cls.model_fields.values() if (sub := model_in(f.annotation)) is not None]
    assert len(seen) >= 10


@pytest.mark.parametrize("value, hint", [("bogus", None), ("dpp", "did you mean 'ddp'?")])
def test_unknown_trainer_strategy_lists_choices(value: str, hint: str | None, cli, in_tmp: Path) -> None:
    msg = only_error(cli(["train", "mlstm_stc", "--print-config", "--set", f"trainer.strategy={value}"]))
    assert f"trainer.strategy '{value}' is not a Lightning strategy" in msg
    assert all(name in msg for name in ("auto", "ddp", "ddp_spawn", "fsdp", "single_device"))
    if hint:
        assert msg.endswith(hint)


def test_strategy_names_are_lightnings() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    from ternkit.recipe import STRATEGIES, recipe_from_dict

    registered = set(StrategyRegistry.available_strategies())
    assert set(STRATEGIES) - {"auto"} <= registered
    assert recipe_from_dict({"trainer": {"strategy": "DDP"}}).trainer.strategy == "ddp"  # Lightning lower-cases too


@pytest.mark.parametrize("item", ["trainer.bogus=1", "model.moe.bogus=1", "model.quant.bogus=1", "data.parity.bogus=1",
                                  "data.mqar.bogus=1", "quant.bogus=1"])
def test_set_unknown_key_in_known_section_says_unknown_key(item: str, cli, in_tmp: Path) -> None:
    msg = only_error(cli(["train", "mlstm_stc", "--print-config", "--set", item]))
    key = item.split("=")[0].replace("quant.", "model.quant.", 1) if item.startswith("quant.") else item.split("=")[0]
    assert f"unknown key '{key}'" in msg and "valid keys here" in msg
    assert "mapping" not in msg


def test_set_into_a_file_value_that_is_not_a_section_names_the_file(cli, in_tmp: Path) -> None:
    bad = in_tmp / "t.yaml"
    bad.write_text("trainer: 5\n")
    msg = only_error(cli(["train", str(bad), "--print-config", "--set", "trainer.max_steps=3"]))
    assert "t.yaml" in msg and "'trainer' is 5" in msg and "--set trainer.max_steps=3" in msg


def test_set_inside_free_form_extra_mapping_works(cli, in_tmp: Path) -> None:
    res = cli(["train", "mlstm_stc", "--print-config", "--set", "model.extra.note=hello"])
    assert res.code == 0, res.text
    assert "note: hello" in res.out


# ------------------------------------------------------------------------------------- before training


def test_gpu_accelerator_without_gpu_is_refused_before_training(cli, in_tmp: Path, token_cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for acc in ("gpu", "cuda"):
        res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache)
                  + sets(f"trainer.accelerator={acc}"))
        msg = only_error(res)
        assert f"trainer.accelerator={acc}" in msg and "no GPU is visible" in msg and "trainer.accelerator=cpu" in msg
    _no_runs(in_tmp)


def test_more_gpus_than_visible_is_refused(cli, in_tmp: Path, token_cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache)
              + sets("trainer.accelerator=gpu", "trainer.devices=4"))
    msg = only_error(res)
    assert "trainer.devices=4" in msg and "1 is visible" in msg
    _no_runs(in_tmp)


def test_absurd_d_model_is_refused_with_numbers_before_allocating(cli, in_tmp: Path, token_cache: Path) -> None:
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache)
              + sets("model.d_model=100000000", "model.n_blocks=2", "model.n_heads=4"))
    msg = only_error(res)
    assert "model.d_model=100000000" in msg and "e17 parameters" in msg and "EB in fp32" in msg
    assert "of memory" in msg and "lower model.d_model" in msg
    _no_runs(in_tmp)


@pytest.mark.parametrize("dry_run", [False, True])
def test_absurd_n_blocks_is_refused(dry_run: bool, cli, in_tmp: Path, token_cache: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import ternkit.models.config as config

    # A fixed 1 GB machine, so the test never allocates, whatever memory the test machine has.
    monkeypatch.setattr(config, "physical_memory_bytes", lambda: 10**9)
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache) + sets("model.n_blocks=100000")
              + (["--dry-run"] if dry_run else []))
    msg = only_error(res)
    assert "model.n_blocks=100000" in msg and "1 GB of memory" in msg and "parameters" in msg
    assert ("to train with adamw" in msg) != dry_run  # a dry run only builds the model
    _no_runs(in_tmp)


def test_parameter_estimate_matches_built_models() -> None:
    from ternkit.models.lm import XLSTMLM
    from ternkit.recipe import load_recipe

    cases = [("mlstm_stc", []), ("xlstm_dense", []), ("moe_ternary", ["model.moe.experts=4", "model.moe.top_k=2"]),
             ("mlstm_stc", ["model.tie_embeddings=false", "model.ternary_projections=[up]", "model.ffn=[dense, ternary]"]),
             ("moe_ternary", ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.shared_expert=true"])]
    for name, overrides in cases:
        cfg = load_recipe(name, overrides + ["model.d_model=32", "model.n_heads=4"]).model.with_vocab(256)
        built = sum(p.numel() for p in XLSTMLM(cfg).parameters())
        assert cfg.estimate_parameters() == built, (name, overrides)


def test_recipe_tokenizer_file_not_utf8_or_not_json(cli, in_tmp: Path, token_cache: Path) -> None:
    cases = {"latin.json": "{\"a\": \"café\"}".encode("latin-1"), "broken.json": b"{not json",
             "list.json": b"[1, 2, 3]"}
    expect = {"latin.json": "is not UTF-8 text (byte 10", "broken.json": "is not valid JSON",
              "list.json": "holds a JSON array"}
    for name, data in cases.items():
        (in_tmp / name).write_bytes(data)
    before = snapshot([in_tmp / n for n in cases])
    for name in cases:
        res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache)
                  + sets("tokenizer.kind=file", f"tokenizer.path={in_tmp / name}"))
        msg = only_error(res)
        assert name in msg and expect[name] in msg and "tokenizer.json" in msg
    assert snapshot(list(before)) == before
    _no_runs(in_tmp)


# ------------------------------------------------------------------------------------------ export


def test_export_to_an_existing_file_is_refused(cli, in_tmp: Path, toy_run: Path) -> None:
    target = in_tmp / "afile"
    target.write_text("mine")
    before = snapshot([target])
    msg = only_error(cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(target)]))
    assert "afile is a file, not a folder" in msg and "-o" in msg
    assert snapshot([target]) == before and listing(in_tmp) == ["afile"]


@pytest.mark.parametrize("force", [False, True])
def test_export_into_the_run_folder_is_refused_before_writing(force: bool, cli, in_tmp: Path, toy_run: Path) -> None:
    run = in_tmp / "run"
    shutil.copytree(toy_run, run)
    before, names = snapshot(all_files(run)), listing(run)
    argv = ["export", str(run / "last.ckpt"), "--packed", "-o", str(run)] + (["--force"] if force else [])
    msg = only_error(cli(argv))
    assert "holds last.ckpt" in msg and f"-o {run / 'export'}" in msg
    assert listing(run) == names and snapshot(all_files(run)) == before


def test_export_into_the_run_folder_named_in_the_checkpoint_is_refused(cli, in_tmp: Path, toy_run: Path) -> None:
    # The checkpoint moved away from its run folder, which its run_info still names.
    run = in_tmp / "run"
    shutil.copytree(toy_run, run)
    (in_tmp / "elsewhere").mkdir()
    shutil.copyfile(toy_run / "last.ckpt", in_tmp / "elsewhere" / "last.ckpt")
    ckpt = torch.load(in_tmp / "elsewhere" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["ternkit"]["run_info"]["run_dir"] = str(run)
    torch.save(ckpt, in_tmp / "elsewhere" / "last.ckpt")
    before, names = snapshot(all_files(run)), listing(run)
    msg = only_error(cli(["export", str(in_tmp / "elsewhere" / "last.ckpt"), "--packed", "-o", str(run), "--force"]))
    assert "run folder" in msg and f"-o {run / 'export'}" in msg
    assert listing(run) == names and snapshot(all_files(run)) == before


def test_export_into_read_only_folder(cli, in_tmp: Path, toy_run: Path) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root ignores permissions; test_export_write_failure_leaves_nothing covers EACCES")
    ro = in_tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        msg = only_error(cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(ro / "out")]))
        assert "Permission denied" in msg and "folder you can write to" in msg
        assert not (ro / "out").exists()
        msg = only_error(cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(ro)]))
        assert "Permission denied" in msg and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free some disk space"), (errno.EACCES, "folder you can write to")],
                         ids=["full-disk", "no-permission"])
@pytest.mark.parametrize("fails", ["weights", "config"])
def test_export_write_failure_leaves_nothing(code: int, words: str, fails: str, cli, in_tmp: Path, toy_run: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    if fails == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    else:
        real = Path.write_text

        def write_text(self: Path, *args: object, **kwargs: object) -> int:
            if self.name.startswith(".config.json"):
                self.write_bytes(b"{\"half")  # a partial file, as a full disk leaves it
                boom()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    # A fresh folder (two levels that do not exist yet) and an earlier export overwritten with --force.
    fresh = in_tmp / "new" / "export"
    msg = only_error(cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(fresh)]))
    assert os.strerror(code) in msg and words in msg and "nothing was written" in msg
    assert not (in_tmp / "new").exists()
    old = in_tmp / "old"
    old.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "notes.txt"):
        (old / name).write_text(f"earlier {name}")
    before, names = snapshot(all_files(old)), listing(old)
    msg = only_error(cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(old), "--force"]))
    assert os.strerror(code) in msg
    assert listing(old) == names and snapshot(all_files(old)) == before


def test_safetensors_os_error_becomes_oserror(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ternkit.export import _save_weights

    with pytest.raises(OSError) as info:
        _save_weights(save_file, {"a": torch.zeros(2)}, tmp_path / "missing" / "x.safetensors", {})
    assert info.value.errno == errno.ENOENT


# --------------------------------------------------------------------------------------- recipes copy


def test_recipes_copy_onto_itself_is_refused(cli, in_tmp: Path) -> None:
    src = in_tmp / "my.yaml"
    assert cli(["recipes", "copy", "mlstm_stc", str(src)]).code == 0
    before = snapshot([src])
    for dest in (str(src), str(in_tmp), "./my.yaml"):
        msg = only_error(cli(["recipes", "copy", str(src), dest, "--force"]))
        assert "is the recipe being copied" in msg and "another destination" in msg
    assert snapshot([src]) == before and listing(in_tmp) == ["my.yaml"]


# ------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("flags, words", [
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--top-k", "-5"], "--top-k must be at least 1, got -5"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--temperature", "-0.5"], "--temperature must not be negative, got -0.5"),
], ids=["top-k-0", "top-k-negative", "temperature-nan", "temperature-inf", "temperature-negative"])
def test_generate_bad_sampling_settings(flags: list[str], words: str, cli, toy_run: Path, tmp_path: Path) -> None:
    msg = only_error(cli(["generate", str(toy_run / "last.ckpt"), "def ", "-n", "2"] + flags))
    assert words in msg
    # Checked before the model is read: a missing checkpoint still gets the sampling sentence.
    assert words in only_error(cli(["generate", str(tmp_path / "nothing.ckpt"), "def ", "-n", "2"] + flags))


def test_generate_temperature_zero_is_greedy(cli, toy_run: Path) -> None:
    # Documented: --temperature 0 means greedy, so the seed does not matter.
    runs = [cli(["generate", str(toy_run / "last.ckpt"), "def ", "-n", "6", "--temperature", "0", "--seed", str(s)])
            for s in (1, 2)]
    assert all(r.code == 0 for r in runs), runs[0].text
    assert runs[0].out == runs[1].out


@pytest.mark.parametrize("kind", ["export", "checkpoint"])
@pytest.mark.parametrize("content, words", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "is not UTF-8 text (byte 0"),
    (b"{\"model\": ", "is not valid JSON"),
    (b"\"just a string\"", "holds a JSON string"),
], ids=["binary", "truncated-json", "json-string"])
def test_generate_with_damaged_tokenizer_json(kind: str, content: bytes, words: str, cli, in_tmp: Path,
                                              toy_run: Path, toy_export: Path) -> None:
    folder = in_tmp / kind
    shutil.copytree(toy_export if kind == "export" else toy_run, folder)
    (folder / "tokenizer.json").write_bytes(content)
    before = snapshot(all_files(folder))
    source = folder if kind == "export" else folder / "last.ckpt"
    msg = only_error(cli(["generate", str(source), "def ", "-n", "2"]))
    assert "tokenizer.json" in msg and words in msg
    assert snapshot(all_files(folder)) == before


# ------------------------------------------------------------------------------ hand-edited metadata


def _edit_config(folder: Path, edit: str) -> None:
    path = folder / "config.json"
    if edit == "bad-json":
        path.write_text("{\"model\": {\"d_model\": 32,,}")
        return
    cfg = json.loads(path.read_text())
    if edit == "no-model":
        del cfg["model"]
    elif edit == "no-vocab":
        del cfg["model"]["vocab_size"]
    elif edit == "wrong-type":
        cfg["model"]["d_model"] = "thirty-two"
    elif edit == "other-shape":
        cfg["model"]["n_heads"] = 2
    elif edit == "not-a-mapping":
        cfg["model"] = [1, 2]
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, words", [
    ("bad-json", "is not valid JSON (line 1"),
    ("no-model", "has no 'model' key"),
    ("no-vocab", "lacks the key 'vocab_size'"),
    ("wrong-type", "'model.d_model' must be an integer, got 'thirty-two'"),
    ("other-shape", "n_heads=2 vs 4"),
    ("not-a-mapping", "not a mapping"),
])
def test_hand_edited_export_config(edit: str, words: str, cli, in_tmp: Path, toy_export: Path) -> None:
    folder = in_tmp / "export"
    shutil.copytree(toy_export, folder)
    _edit_config(folder, edit)
    before = snapshot(all_files(folder))
    for argv in (["generate", str(folder), "def ", "-n", "2"], ["stats", str(folder)]):
        msg = only_error(cli(argv))
        assert "config.json" in msg and words in msg and "export" in msg
    assert snapshot(all_files(folder)) == before


@pytest.mark.parametrize("edit, words", [
    ("no-model-config", "lacks the key 'model_config'"),
    ("metadata-not-a-mapping", "its ternkit metadata is not a mapping"),
    ("model-config-not-a-mapping", "'model_config' that is not a mapping"),
    ("wrong-type", "'model.d_model' must be an integer, got 'x'"),
    ("no-vocab", "lacks the key 'vocab_size'"),
    ("unknown-key", "unknown key 'd_modle'"),
    ("absurd-size", "parameters"),
])
def test_hand_edited_checkpoint_metadata(edit: str, words: str, cli, in_tmp: Path, toy_run: Path) -> None:
    ckpt = torch.load(toy_run / "last.ckpt", map_location="cpu", weights_only=True)
    meta = ckpt["ternkit"]
    if edit == "no-model-config":
        del meta["model_config"]
    elif edit == "metadata-not-a-mapping":
        ckpt["ternkit"] = 5
    elif edit == "model-config-not-a-mapping":
        meta["model_config"] = "d_model=32"
    elif edit == "wrong-type":
        meta["model_config"]["d_model"] = "x"
    elif edit == "no-vocab":
        del meta["model_config"]["vocab_size"]
    elif edit == "unknown-key":
        meta["model_config"]["d_modle"] = 32
    elif edit == "absurd-size":
        meta["model_config"]["d_model"] = 100_000_000
    path = in_tmp / "edited.ckpt"
    torch.save(ckpt, path)
    before = snapshot([path])
    for argv in (["stats", str(path)], ["export", str(path), "--packed", "-o", str(in_tmp / "out")],
                 ["generate", str(path), "def ", "-n", "2"]):
        msg = only_error(cli(argv))
        assert "edited.ckpt" in msg and words in msg
    assert snapshot([path]) == before
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------------- no library noise, real process


_QUIET_CASES = {
    "strategy": ["train", "mlstm_stc", "--print-config", "--set", "trainer.strategy=bogus"],
    "d_model": ["train", "mlstm_stc", "--no-progress", "--set", "model.d_model=100000000"],
    "top-k": ["generate", "{ckpt}", "def ", "--top-k", "0"],
    "export-file": ["export", "{ckpt}", "--packed", "-o", "{file}"],
    "no-model-config": ["stats", "{nomc}"],
    "bad-tokenizer": ["generate", "{run}/last.ckpt", "def "],  # the model is built before the tokenizer is read
}


@pytest.mark.parametrize("case", list(_QUIET_CASES))
def test_only_the_sentence_reaches_stderr_in_a_real_process(case: str, toy_run: Path, tmp_path: Path) -> None:
    # In-process tests cannot see warnings (pytest records them); a real process prints what the user sees.
    ckpt = torch.load(toy_run / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["ternkit"]["model_config"]
    torch.save(ckpt, tmp_path / "nomc.ckpt")
    (tmp_path / "afile").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(toy_run / "last.ckpt", run / "last.ckpt")
    (run / "tokenizer.json").write_bytes(b"\xff\xfe not text")
    argv = [a.format(ckpt=toy_run / "last.ckpt", file=tmp_path / "afile", nomc=tmp_path / "nomc.ckpt", run=run)
            for a in _QUIET_CASES[case]]
    proc = run_cli_subprocess(argv, cwd=tmp_path, timeout=120, env={"PYTHONWARNINGS": "default"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "runs").exists()
