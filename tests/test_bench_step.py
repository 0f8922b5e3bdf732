"""``bench step`` at a tiny size (the main job's model vs its float twin) and ``trainer.compile``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ternkit.bench import STEP_GOAL, bench_train_step
from ternkit.cli.main import app
from ternkit.models.lm import XLSTMLM
from ternkit.modules.linear import TernaryLinear
from ternkit.recipe import load_recipe

from conftest import flat as _flat

runner = CliRunner()

TINY = ["model.d_model=16", "model.n_blocks=1", "model.context_length=16", "trainer.batch_size=2"]


def test_bench_train_step_times_both_models_and_the_twin_is_float() -> None:
    r = bench_train_step(TINY, repeats=2)
    assert set(r["median_s"]) == {"twin", "main"} and all(v > 0 for v in r["median_s"].values())
    assert r["ratio"] == pytest.approx(r["median_s"]["main"] / r["median_s"]["twin"])
    assert r["goal"] == STEP_GOAL and r["met"] == (r["ratio"] <= STEP_GOAL)
    assert [len(v) for v in r["samples_s"].values()] == [2, 2]
    assert r["settings"]["d_model"] == 16 and r["settings"]["batch_size"] == 2
    assert r["models"]["twin"] == {"gate_mode": "sigmoid", "memory_backend": "dense", "ternary_layers": 0}
    assert r["models"]["main"]["ternary_layers"] > 0 and r["models"]["main"]["memory_backend"] == "stc_sparse"
    # A --set cannot turn the baseline ternary: the twin's overrides win.
    r2 = bench_train_step([*TINY, "model.ternary_projections=[up]"], repeats=1)
    assert r2["models"]["twin"]["ternary_layers"] == 0 and r2["models"]["main"]["ternary_layers"] == 1


def test_cli_bench_step_table_json_and_bad_set(tmp_path: Path, keep_threads) -> None:
    out = tmp_path / "s.json"
    argv = ["bench", "step", "--repeats", "1", "--threads", "1", "--json", str(out)]
    for s in TINY:
        argv += ["--set", s]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    text = _flat(res.output)
    assert "Training step: 1 blocks x d_model 16" in text and "main job's model" in text and "float twin" in text
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "step" and rep["machine"]["torch_threads"] == 1 and rep["compile"] is False
    bad = runner.invoke(app, ["bench", "step", "--set", "model.d_modle=16"])
    assert bad.exit_code == 2 and "d_modle" in _flat(bad.output) and "Traceback" not in bad.output


def test_trainer_compile_defaults_off_and_is_validated() -> None:
    from ternkit.errors import TernkitError

    assert load_recipe("mlstm_stc").trainer.compile is False
    assert load_recipe("mlstm_stc", ["trainer.compile=true"]).trainer.compile is True
    with pytest.raises(TernkitError, match="compile"):
        load_recipe("mlstm_stc", ["trainer.compile=maybe"])


def test_train_compiles_the_model_only_when_asked(tmp_path: Path, monkeypatch, token_cache) -> None:
    from conftest import toy_text_sets
    from ternkit.train.run import train

    calls: list[str] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(type(self).__name__))
    for flag, dry in ((True, True), (False, False), (True, False)):
        toy = [a for a in toy_text_sets(token_cache, 1) if a != "--set"]
        r = load_recipe("mlstm_stc", [*toy, *TINY, f"trainer.compile={str(flag).lower()}",
                                      f"checkpoint.dir={tmp_path / f'run-{flag}-{dry}'}"])
        train(r, dry_run=dry, progress=False)
    assert calls == ["XLSTMLM"]  # the real run with compile on; neither the dry run nor compile off


@pytest.mark.slow
def test_compiled_model_keeps_its_state_dict_and_computes_the_same_loss() -> None:
    # nn.Module.compile() is in place: the keys checkpoints and exports read do not change, and the compiled
    # forward/backward are the eager ones up to float rounding (ternary layers and STC keys included).
    r = load_recipe("mlstm_stc", TINY)
    torch.manual_seed(0)
    eager = XLSTMLM(r.model.with_vocab(256)).train()
    comp = XLSTMLM(r.model.with_vocab(256)).train()
    comp.load_state_dict(eager.state_dict())
    keys = list(comp.state_dict())
    comp.compile()
    assert list(comp.state_dict()) == keys and any(isinstance(m, TernaryLinear) for m in comp.modules())
    x = torch.randint(0, 256, (2, 17))
    losses, grads = [], []
    for m in (eager, comp):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.blocks[0].mlstm.proj_up.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
