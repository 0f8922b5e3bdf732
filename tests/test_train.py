"""`ternkit train` end to end at toy scale: loss falls, run folder, --print-config, --dry-run, every shipped
recipe, refusing to overwrite a run, telemetry, integer-state updates once per optimizer step, the NaN guard."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (TOY_STEPS, assert_one_sentence_error, read_metrics, sets, snapshot, toy_text_sets,
                      toy_train_argv, train_losses)


def test_toy_training_loss_falls_and_run_folder(toy_run: Path) -> None:
    for name in ("last.ckpt", "best.ckpt", "recipe.yaml", "tokenizer.json", "summary.json", "logs/metrics.csv"):
        assert (toy_run / name).is_file(), name
    summary = json.loads((toy_run / "summary.json").read_text())
    assert summary["steps"] == TOY_STEPS
    losses = train_losses(toy_run)
    first = losses[min(losses)]
    assert min(losses) == 0 and len(losses) == TOY_STEPS  # log_every=1: one row per step
    assert summary["train_loss"] == pytest.approx(losses[TOY_STEPS - 1], rel=1e-6)
    assert summary["train_loss"] < first - 0.5, (first, summary["train_loss"])  # ln(256)=5.5 at init
    assert summary["val_loss"] is not None and math.isfinite(summary["val_loss"])
    assert summary["counts"]["ternary"] > 0 and summary["counts"]["float"] > 0
    ckpt = torch.load(toy_run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == TOY_STEPS and ckpt["ternkit"]["model_config"]["vocab_size"] == 256
    # The resolved recipe in the run folder reloads to the recipe that trained it.
    from ternkit.recipe import load_recipe

    r = load_recipe(toy_run / "recipe.yaml")
    assert r.trainer.max_steps == TOY_STEPS and r.model.memory_backend == "stc_sparse"


def test_telemetry_logged_trit_fractions(toy_run: Path) -> None:
    rows = read_metrics(toy_run)
    tele = [r for r in rows if any(k.startswith("trits/") and r[k] for k in r)]
    # telemetry_every=4, after optimizer steps 4, 8 and 12, labelled like that step's loss (0-based: 3, 7, 11).
    assert {int(r["step"]) for r in tele} == {3, 7, 11}
    row = tele[0]
    for key in [k for k in row if k.startswith("trits/") and k.endswith("/frac_zero")]:
        layer = key.removesuffix("/frac_zero")
        total = sum(float(row[f"{layer}/{f}"]) for f in ("frac_neg", "frac_zero", "frac_pos"))
        assert total == pytest.approx(1.0, abs=1e-6)
    assert any(k.startswith("stc/") for k in row)  # the STC memory reports its thresholds


def test_print_config_reloads_to_same_recipe(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ternkit.recipe import load_recipe, recipe_from_dict

    monkeypatch.chdir(tmp_path)
    over = sets("trainer.max_steps=7", "model.d_model=48", "model.moe.experts=5")
    res = cli(["train", "moe_ternary", "--print-config"] + over)
    assert res.code == 0, res.text
    printed = recipe_from_dict(yaml.safe_load(res.out))
    assert printed.to_dict() == load_recipe("moe_ternary", over[1::2]).to_dict()
    assert printed.trainer.max_steps == 7 and printed.model.moe.experts == 5
    assert not (tmp_path / "runs").exists()


def test_dry_run_counts_by_kind_and_writes_no_checkpoint(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         token_cache: Path) -> None:
    from ternkit.recipe import load_recipe
    from ternkit.train.module import TernkitLM
    from ternkit.train.run import model_config_from_recipe

    monkeypatch.chdir(tmp_path)
    over = toy_text_sets(token_cache) + sets("name=dry")
    res = cli(["train", "mlstm_stc", "--dry-run", "--no-progress"] + over)
    assert res.code == 0, res.text
    counts = {k: int(v.replace(",", "")) for k, v in re.findall(r"(ternary|float)\s*\S\s*([\d,]+)", res.out)}
    # Independent count: latent ternary weights of up/qkv/down; everything else is float.
    r = load_recipe("mlstm_stc", over[1::2])
    model = TernkitLM(model_config_from_recipe(r, 256), {"lr": 1e-3}, {}, 1).model
    tern = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "TernaryLinear")
    assert counts == {"ternary": tern, "float": sum(p.numel() for p in model.parameters()) - tern}
    assert tern > 0
    assert not list((tmp_path / "runs" / "dry").glob("*.ckpt"))


TOY_RECIPES = {
    "mlstm_stc": [],
    "xlstm_dense": [],
    "moe_ternary": sets("model.moe.experts=4", "model.moe.top_k=2", "model.moe.hidden=16"),
    "parity": sets("model.d_model=32", "model.n_heads=2", "model.n_blocks=1", "data.parity.train_len_min=4",
                   "data.parity.train_len_max=8",
                   "data.parity.eval_len=16", "data.parity.num_val=8", "trainer.batch_size=4"),
    "mqar": sets("model.d_model=32", "model.n_heads=2", "model.n_blocks=1", "model.context_length=32",
                 "data.mqar.vocab_size=32", "data.mqar.seq_len=32", "data.mqar.num_kv_pairs=4",
                 "data.mqar.num_val=8", "trainer.batch_size=4"),
}


def test_recipe_quant_group_size_and_forget_bias_reach_the_model() -> None:
    from ternkit.models.config import XLSTMLMConfig
    from ternkit.models.lm import XLSTMLM
    from ternkit.modules.group import GroupTernaryLinear
    from ternkit.recipe import recipe_from_dict
    from ternkit.train.run import model_config_from_recipe

    r = recipe_from_dict({"model": {"d_model": 32, "n_blocks": 2, "n_heads": 2, "ternary_projections": "all",
                                    "tie_embeddings": False, "ffn": ["ternary", "moe"], "forget_bias_init": [0.5, 1.5],
                                    "moe": {"experts": 4, "top_k": 2, "hidden": 16}},
                          "quant": {"scale": "group", "group_size": 16}})
    cfg = model_config_from_recipe(r, 64)
    model = XLSTMLM(cfg)
    groups = [m for m in model.modules() if isinstance(m, GroupTernaryLinear)]
    # up, q, k, v, down per block (10), SwiGLU w13/w2 (2), 4 experts x w1/w3/w2 (12), head (1)
    assert len(groups) == 25 and {m.group_size for m in groups} == {16}
    assert all(m.n_groups == -(-m.in_features // 16) for m in groups)
    assert XLSTMLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).quant.group_size == 16
    for block in model.blocks:
        assert torch.allclose(block.mlstm.fgate.bias, torch.tensor([0.5, 1.5]))
    default = model_config_from_recipe(recipe_from_dict({}), 64)
    assert default.forget_bias_init == (3.0, 6.0) and default.quant.group_size == 32
    old = {"vocab_size": 64, "ternary": ["up"], "ternary_scale": "group"}  # a checkpoint written before the key
    assert XLSTMLMConfig.from_dict(old).quant.group_size == 32


@pytest.mark.slow
def test_shipped_parity_recipe_learns_and_length_generalizes(cli, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    quiet = sets("logging.tensorboard=false", "trainer.accelerator=cpu", "trainer.devices=1")
    res = cli(["train", "parity", "--no-progress", "--json"] + quiet)
    assert res.code == 0, res.text
    ternary = json.loads((tmp_path / "runs" / "parity" / "summary.json").read_text())
    assert ternary["val_acc"] >= 0.99  # whole-string parity at length 64 after training at length 16
    res = cli(["train", "parity", "--no-progress", "--json"] + quiet
              + sets("model.gate_mode=sigmoid", "checkpoint.dir=runs/sigmoid"))
    assert res.code == 0, res.text
    sigmoid = json.loads((tmp_path / "runs" / "sigmoid" / "summary.json").read_text())
    assert sigmoid["val_acc"] < 0.6  # a gate in (0, 1) cannot carry parity: chance


def test_recipes_list_matches_toy_table(cli) -> None:
    res = cli(["recipes", "list"])
    assert res.code == 0
    from ternkit.recipe import list_recipes

    assert set(list_recipes()) == set(TOY_RECIPES)


@pytest.mark.parametrize("name", sorted(TOY_RECIPES))
def test_every_shipped_recipe_trains_at_toy_scale(name: str, cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    synthetic = name in ("parity", "mqar")
    base = sets("trainer.max_steps=3", "trainer.val_every=3", "trainer.val_batches=1", "trainer.log_every=1",
                "schedule.warmup_steps=1", "logging.tensorboard=false", "trainer.accelerator=cpu",
                "trainer.devices=1") if synthetic else toy_text_sets(token_cache, 3) + sets("trainer.sample_every=2")
    res = cli(["train", name, "--no-progress", "--json"] + base + TOY_RECIPES[name])
    assert res.code == 0, res.text
    summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    assert math.isfinite(summary["val_loss"])
    if synthetic:
        assert 0.0 <= summary["val_acc"] <= 1.0
    else:
        assert summary["sample"].startswith("def ")
        assert res.out.count("--- sample at step 2 ---") == 1  # trainer.sample_every=2 within 3 steps
    assert "LeafSpec" not in res.text and "Traceback" not in res.text


def test_second_train_into_existing_run_is_refused(cli, toy_run: Path) -> None:
    before = snapshot([toy_run / "last.ckpt", toy_run / "recipe.yaml", toy_run / "summary.json"])
    res = cli(["train", str(toy_run / "recipe.yaml"), "--no-progress"])
    msg = assert_one_sentence_error(res)
    assert "--resume auto" in msg and "already holds a run" in msg
    assert snapshot(list(before)) == before


def test_integer_state_updates_once_per_optimizer_step(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    # grad_accum=2: two backward passes per optimizer step, still one integer update per step.
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache, 3)
              + sets("name=grp", "quant.scale=group", "trainer.grad_accum=2"))
    assert res.code == 0, res.text
    ckpt = torch.load(tmp_path / "runs" / "grp" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    steps = {k: int(v) for k, v in ckpt["state_dict"].items() if k.endswith(".step") and v.dtype == torch.int64}
    assert len(steps) >= 3  # up, qkv, down of the one block
    assert set(steps.values()) == {3}, steps
    moved = [k for k, v in ckpt["state_dict"].items() if k.endswith(".corr_accum") and bool(v.any())]
    assert moved  # the accumulators really moved


def _scale_loss_from(monkeypatch: pytest.MonkeyPatch, step: int, factor: float) -> None:
    """Multiply the training loss by ``factor`` from optimizer step ``step`` on (nan poisons it, 10 makes it spike)."""
    from ternkit.train.module import TernkitLM

    orig = TernkitLM._losses

    def scaled(self, batch):  # type: ignore[no-untyped-def]
        ce, aux, ntok = orig(self, batch)
        return (ce * factor, aux, ntok) if self.global_step >= step else (ce, aux, ntok)

    monkeypatch.setattr(TernkitLM, "_losses", scaled)


def test_nan_loss_stops_with_one_sentence_and_keeps_good_checkpoint(cli, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path, token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    _scale_loss_from(monkeypatch, 3, float("nan"))
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache, 8)
              + sets("name=nan", "checkpoint.every_steps=1"))
    msg = assert_one_sentence_error(res)
    assert "nan" in msg and "at step 3" in msg and "last.ckpt" in msg and "(step 2)" in msg
    ckpt = torch.load(tmp_path / "runs" / "nan" / "last.ckpt", map_location="cpu", weights_only=True)
    # Three good optimizer steps (0, 1, 2) completed and the forward of step 3 was NaN: the checkpoint after
    # step 2 led straight to it, so the one kept is the checkpoint before it, whose next step was finite.
    assert ckpt["global_step"] == 2
    assert not list((tmp_path / "runs" / "nan").glob(".*.tmp"))
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())
    from ternkit.export import load_model

    model, info = load_model(tmp_path / "runs" / "nan" / "last.ckpt")
    assert info["global_step"] == 2
    assert bool(torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))).all())


def test_divergence_monitor_counts_spikes_against_the_best_running_level() -> None:
    from ternkit.train.module import DivergenceMonitor

    mon = DivergenceMonitor(factor=2.0, patience=3, warmup=2)
    flags = [mon.update(v, step) for step, v in enumerate([4.0, 3.0, 2.0, 2.0, 2.0])]
    assert not any(flags) and mon.best_step == 4 and mon.ratio == pytest.approx(2.0 / mon.best)
    # Three steps above 2x the best level in a row diverge; a step back below resets the count.
    assert [mon.update(v, 5 + i) for i, v in enumerate([9.0, 9.0, 1.0, 9.0, 9.0, 9.0])] == \
        [False, False, False, False, False, True]
    restored = DivergenceMonitor(factor=2.0, patience=3, warmup=2)
    restored.load_state_dict(mon.state_dict())
    assert restored.state_dict() == mon.state_dict()
    off = DivergenceMonitor(factor=None, patience=1, warmup=1)
    assert not any(off.update(v, i) for i, v in enumerate([1.0, 50.0, 50.0]))


def test_divergence_stops_with_one_sentence_and_logs_the_spike(cli, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path, token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    _scale_loss_from(monkeypatch, 6, 10.0)
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache, 12)
              + sets("name=div", "checkpoint.every_steps=2", "trainer.divergence_patience=3"))
    msg = assert_one_sentence_error(res)
    assert "diverged" in msg and "step 8" in msg and "last.ckpt" in msg and "divergence_stop" in msg
    run = tmp_path / "runs" / "div"
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["ternkit"]["divergence"]["over"] == 2
    spikes = [float(r["train/spike"]) for r in read_metrics(run) if r.get("train/spike")]
    assert max(spikes[:6]) < 2.0 and min(spikes[6:]) > 2.0  # the spike ratio is in metrics.csv
    # Reporting only: the same run trains to its end.
    res = cli(["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache, 12)
              + sets("name=div2", "trainer.divergence_patience=3", "trainer.divergence_stop=false"))
    assert res.code == 0, res.text


def test_schedule_kinds_and_two_stage_point() -> None:
    from ternkit.train.optim import lr_factor, weight_decay_factor

    # warmup 10 -> 1.0 at step 9; halfway through the decay: cosine and linear both at the mean of 1 and 0.1.
    assert lr_factor(9, 110, 10) == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, "cosine") == pytest.approx(0.55)
    assert lr_factor(60, 110, 10, "linear") == pytest.approx(0.55)
    assert lr_factor(35, 110, 10, "linear") == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_factor(35, 110, 10, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, 110, 10, "linear") == pytest.approx(0.1)
    # BitNet two-stage at 70%: LR halves and weight decay switches off at step 70, not at the midpoint.
    assert lr_factor(69, 100, 0, "constant", two_stage=True, two_stage_at=0.7) == 1.0
    assert lr_factor(70, 100, 0, "constant", two_stage=True, two_stage_at=0.7) == 0.5
    assert lr_factor(70, 100, 0, "cosine", two_stage=True, two_stage_at=0.7) == pytest.approx(0.5)
    assert weight_decay_factor(69, 100, True, 0.7) == 1.0 and weight_decay_factor(70, 100, True, 0.7) == 0.0
    assert weight_decay_factor(99, 100, False, 0.7) == 1.0


def test_parameter_counts_integer_state_is_persistent_integer_tensors() -> None:
    from ternkit.models.config import XLSTMLMConfig
    from ternkit.models.lm import XLSTMLM
    from ternkit.train.run import parameter_counts

    base = dict(vocab_size=32, d_model=32, n_blocks=1, n_heads=2, memory_backend="stc_sparse",
                ternary_projections=["up", "down"], tie_embeddings=False)
    latent = parameter_counts(XLSTMLM(XLSTMLMConfig(**base)))
    assert latent["integer_state"] == 0  # STC's bool 'initialized' flags are not state worth counting
    model = XLSTMLM(XLSTMLMConfig(**base, quant={"scale": "group"}))
    counts = parameter_counts(model)
    up, down = model.blocks[0].mlstm.proj_up, model.blocks[0].mlstm.proj_down
    expected = sum(m.votes.numel() + m.packed_trits.numel() + m.exponent.numel() + m.corr_accum.numel() + 1
                   for m in (up, down))
    assert counts["integer_state"] == expected  # votes, packed trits, exponents, accumulators, step; no trit cache
    assert counts["ternary"] == up.in_features * up.out_features + down.in_features * down.out_features


def _toy_train(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, token_cache: Path, steps: int, *items: str):
    """A toy ``ternkit train`` in ``tmp_path`` that must succeed; returns its CliResult."""
    monkeypatch.chdir(tmp_path)
    res = cli(toy_train_argv(token_cache, steps, *items))
    assert res.code == 0, res.text
    return res


def test_no_terminal_gets_plain_progress_lines_and_throughput_in_metrics(cli, monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path, token_cache: Path) -> None:
    res = _toy_train(cli, monkeypatch, tmp_path, token_cache, 4, "name=plain", "trainer.log_every=2")
    lines = [ln for ln in res.err.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 2/4", "step 4/4", "step 4/4"], res.err
    assert "loss " in lines[0] and "tok/s" in lines[0] and lines[-1].startswith("step 4/4 | val loss ")
    rows = read_metrics(tmp_path / "runs" / "plain")
    tps = [float(r["perf/tokens_per_s"]) for r in rows if r.get("perf/tokens_per_s")]
    assert tps and all(t > 0 for t in tps)
    assert any(r.get("perf/wall_s") for r in rows) and any(r.get("perf/step_s") for r in rows)


def test_warmup_longer_than_the_run_gets_a_note_and_one_path_is_a_list(cli, monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path, token_cache: Path) -> None:
    from ternkit.recipe import load_recipe

    res = _toy_train(cli, monkeypatch, tmp_path, token_cache, 2, "name=warm", "schedule.warmup_steps=50")
    assert "note: schedule.warmup_steps (50) is more than trainer.max_steps (2)" in " ".join(res.err.split())
    r = load_recipe("mlstm_stc", overrides=["data.source=files", "data.paths=corpus/*.txt"])
    assert r.data.paths == ["corpus/*.txt"]
