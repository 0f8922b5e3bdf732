"""Recipe schema: shipped recipes validate, typos and wrong types give one clear sentence, --set overrides, CLI verbs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import ternkit.cli.recipes  # noqa: F401  (registers the verb on the app)
from ternkit.cli.app import app
from ternkit.errors import TernkitError
from ternkit.recipe import Recipe, list_recipes, load_recipe, recipe_from_dict, resolve_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("mlstm_stc", "moe_ternary", "xlstm_dense", "parity", "mqar")


def _write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(TernkitError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates(name: str) -> None:
    r = load_recipe(name)
    assert r.name == name
    assert r.description  # every shipped recipe says what it is
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()  # resolved YAML round-trips exactly


def test_shipped_recipes_are_the_repo_files_and_have_the_right_shape() -> None:
    found = list_recipes()
    assert set(SHIPPED) <= set(found)
    assert found["mlstm_stc"].resolve() == (REPO / "recipes" / "mlstm_stc.yaml").resolve()
    stc = load_recipe("mlstm_stc")
    assert (stc.model.memory_backend, stc.model.gate_mode, stc.data.source) == ("stc_sparse", "ternary_decay", "stdlib")
    moe = load_recipe("moe_ternary")
    assert moe.model.ffn_kinds() == ["moe"] * moe.model.n_blocks
    assert (moe.model.moe.experts, moe.model.moe.top_k, moe.model.is_ternary("ffn")) == (12, 3, True)
    dense = load_recipe("xlstm_dense")
    assert (dense.model.d_model, dense.model.n_blocks) == (stc.model.d_model, stc.model.n_blocks)
    assert not any(dense.model.is_ternary(p) for p in ("up", "qkv", "down", "ffn", "head"))
    assert (dense.model.gate_mode, dense.model.memory_backend) == ("sigmoid", "dense")
    par = load_recipe("parity")  # the recipe form of ternkit/parity.py's experiment
    assert (par.model.gate_mode, par.model.n_blocks, par.model.d_model, par.model.forget_bias_init) == \
        ("ternary", 1, 32, (0.5, 0.5))
    assert par.data.parity.eval_len > par.data.parity.train_len_max
    assert stc.model.forget_bias_init == (3.0, 6.0)  # xLSTM's default when a recipe does not say


def test_path_from_repo_root_and_name_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert load_recipe("recipes/mlstm_stc.yaml").name == "mlstm_stc"
    monkeypatch.chdir(tmp_path)
    assert load_recipe("mlstm_stc").model.memory_backend == "stc_sparse"
    assert "did you mean 'mlstm_stc'" in _err(load_recipe, "mlstm_stx")
    assert "not found" in _err(load_recipe, "recipes/nothing_here.yaml")


def test_unknown_key_names_full_path_and_suggests(tmp_path: Path) -> None:
    p = _write(tmp_path, "trainer:\n  max_step: 10\n")
    msg = _err(load_recipe, p)
    assert msg == f"{p}: unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?"
    p = _write(tmp_path, "model:\n  moe:\n    expert: 4\n")
    assert "unknown key 'model.moe.expert'; did you mean 'model.moe.experts'?" in _err(load_recipe, p)
    p = _write(tmp_path, "trainer:\n  lr: 0.1\n")  # right name, wrong section
    assert "did you mean 'optimizer.lr'?" in _err(load_recipe, p)
    p = _write(tmp_path, "modle:\n  d_model: 64\n")
    assert "unknown key 'modle'; did you mean 'model'?" in _err(load_recipe, p)


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    p = _write(tmp_path, "trainer:\n  max_steps: abc\n")
    assert _err(load_recipe, p) == f"{p}: 'trainer.max_steps' must be an integer, got 'abc'."
    p = _write(tmp_path, "model:\n  gate_mode: tanh\n")
    assert "'model.gate_mode' must be one of 'sigmoid', 'ternary', 'ternary_decay', got 'tanh'." in _err(load_recipe, p)
    p = _write(tmp_path, "model:\n  gate_mode: tanh\n  d_model: big\n")
    msg = _err(load_recipe, p)  # the first error in schema order, then a count of the rest
    assert "'model.d_model' must be an integer, got 'big'" in msg and msg.endswith("(and 1 more).")
    p = _write(tmp_path, "model:\n  target_sparsity: 1.5\n")
    assert "'model.target_sparsity' must be less than 1, got 1.5" in _err(load_recipe, p)
    p = _write(tmp_path, "model:\n  d_model: 100\n  n_heads: 3\n")
    assert "must be divisible by model.n_heads" in _err(load_recipe, p)
    p = _write(tmp_path, "model:\n  moe:\n    experts: 2\n    top_k: 3\n")
    assert "model.moe.top_k (3) must not exceed model.moe.experts (2)" in _err(load_recipe, p)


def test_file_errors_missing_and_yaml_syntax(tmp_path: Path) -> None:
    assert "not found" in _err(load_recipe, tmp_path / "absent.yaml")
    p = _write(tmp_path, "model:\n  d_model: 64\n   n_blocks: 2\n")
    msg = _err(load_recipe, p)
    assert "YAML syntax error at line 3" in msg and str(p) in msg
    p = _write(tmp_path, "- just\n- a list\n")
    assert "must be a mapping" in _err(load_recipe, p)


def test_defaults_name_and_int_precision(tmp_path: Path) -> None:
    p = _write(tmp_path, "trainer:\n  precision: 32\n", name="tiny_run.yaml")
    r = load_recipe(p)
    assert r.name == "tiny_run" and r.trainer.precision == "32"
    assert r.run_dir == Path("runs") / "tiny_run"
    assert r.model.ffn_kinds() == ["none"] * r.model.n_blocks
    assert load_recipe(_write(tmp_path, "trainer:\nmodel:\n  moe:\n")).trainer.max_steps == 1000  # empty sections
    assert "seed: 1234" in r.to_yaml() and r.to_dict()["optimizer"]["betas"] == [0.9, 0.95]


def test_forget_bias_init_override_and_shape() -> None:
    r = load_recipe("parity", ["model.forget_bias_init=[1.0, 2.5]"])
    assert r.model.forget_bias_init == (1.0, 2.5)
    assert "model.forget_bias_init" in _err(recipe_from_dict, {"model": {"forget_bias_init": [0.5]}})


def test_set_overrides_are_typed() -> None:
    r = load_recipe("mlstm_stc", ["trainer.max_steps=200", "optimizer.lr=3e-4", "model.tie_embeddings=false",
                                  "model.n_blocks=3", "model.ffn=[dense, moe, ternary]", "model.moe.experts=8",
                                  "data.cache_dir=/tmp/c"])
    assert r.trainer.max_steps == 200 and isinstance(r.trainer.max_steps, int)
    assert r.optimizer.lr == pytest.approx(3e-4)
    assert r.model.tie_embeddings is False
    assert r.model.ffn_kinds() == ["dense", "moe", "ternary"]
    assert r.model.moe.experts == 8 and r.data.cache_dir == "/tmp/c"
    base = load_recipe("mlstm_stc")
    assert base.trainer.max_steps != 200  # overrides do not leak into later loads


def test_set_errors_say_set() -> None:
    assert _err(load_recipe, "mlstm_stc", ["trainer.max_step=5"]) == \
        "--set: unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?"
    assert _err(load_recipe, "mlstm_stc", ["trainer.max_steps=abc"]) == \
        "--set trainer.max_steps=abc: 'trainer.max_steps' must be an integer, got 'abc'."
    assert "expects key=value" in _err(load_recipe, "mlstm_stc", ["trainer.max_steps"])
    assert "'seed' is a value, not a section" in _err(load_recipe, "mlstm_stc", ["seed.x=1"])
    assert "unknown key 'model.moe.topk'; did you mean 'model.moe.top_k'?" in _err(load_recipe, "mlstm_stc", ["model.moe.topk=2"])


def test_model_helpers() -> None:
    r = Recipe()
    assert r.model.is_ternary("up") and not r.model.is_ternary("head")
    r2 = recipe_from_dict({"model": {"ternary_projections": "all", "ffn": ["moe", "none", "none", "dense"],
                                     "tie_embeddings": False}})
    assert r2.model.is_ternary("head") and r2.model.ffn_kinds()[0] == "moe"
    # "all" with a tied head: the recipe, the model and the checkpoint agree that the head stays float.
    tied = recipe_from_dict({"model": {"ternary_projections": "all"}}).model
    assert not tied.is_ternary("head") and tied.ternary == ("up", "qkv", "down", "ffn")
    assert "model.ffn lists 2 kinds" in _err(recipe_from_dict, {"model": {"ffn": ["moe", "none"]}})


def test_cli_list_show_copy(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["recipes", "list"])
    assert res.exit_code == 0
    for name in SHIPPED:
        assert name in res.output
    res = runner.invoke(app, ["recipes", "show", "parity", "--set", "trainer.max_steps=7"])
    assert res.exit_code == 0
    shown = yaml.safe_load(res.output)
    assert shown["trainer"]["max_steps"] == 7 and shown["data"]["source"] == "parity"
    assert shown["model"]["quant"]["scale"] == "absmean"  # defaults are filled in
    res = runner.invoke(app, ["recipes", "show", "parity", "--set", "trainer.max_stp=7"])
    assert res.exit_code == 2 and "did you mean 'trainer.max_steps'" in res.output
    dest = tmp_path / "mine.yaml"
    assert runner.invoke(app, ["recipes", "copy", "mlstm_stc", str(dest)]).exit_code == 0
    assert dest.read_text() == resolve_recipe("mlstm_stc").read_text()  # comments kept
    dest.write_text("edited")
    res = runner.invoke(app, ["recipes", "copy", "mlstm_stc", str(dest)])
    assert res.exit_code == 2 and "--force" in res.output and dest.read_text() == "edited"
    assert runner.invoke(app, ["recipes", "copy", "mlstm_stc", str(dest), "--force"]).exit_code == 0
    assert load_recipe(dest).name == "mine"
    assert runner.invoke(app, ["recipes", "copy", "mlstm_stc", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "mlstm_stc.yaml").is_file()
