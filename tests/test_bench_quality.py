"""``bench quality`` at a tiny size: the variant table, ratios to the float twin, determinism, the JSON and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ternkit.bench import QUALITY_VARIANTS, bench_quality, quality_diverged, quality_recipes
from ternkit.cli.main import app
from ternkit.errors import TernkitError

from conftest import flat as _flat

runner = CliRunner()

# d_model 16, 1 block, context 16, batch 2, 1 val batch; a small slice of the stdlib corpus tokenizes fast.
TINY = ["model.d_model=16", "model.n_blocks=1", "model.context_length=16", "trainer.batch_size=2",
        "trainer.val_batches=1", "data.max_chars=100000"]




def test_quality_recipes_derive_every_variant_from_the_twin() -> None:
    r = quality_recipes(300)
    assert list(r) == list(QUALITY_VARIANTS) and list(r)[0] == "twin"
    assert all(isinstance(sets, tuple) and all("=" in x for x in sets) for _, sets in QUALITY_VARIANTS.values())
    twin = r["twin"]
    assert (twin.model.gate_mode, twin.model.memory_backend, twin.model.ternary_projections) == ("sigmoid", "dense", [])
    m = twin.model
    assert (m.n_blocks, m.d_model, m.context_length, twin.trainer.batch_size) == (4, 128, 64, 12)
    assert twin.trainer.max_steps == twin.trainer.val_every == 300
    assert r["tern_int8"].quant.act_bits == 8 and r["tern_group"].quant.scale == "group"
    assert r["stc_tgate"].model.memory_backend == "stc_sparse" and r["stc_tgate"].model.gate_mode == "ternary"
    # The flagship is the main job's model: its ternary pieces are read from the shipped recipe.
    from ternkit.recipe import load_recipe

    main = load_recipe("mlstm_stc")
    f = r["flagship"].model
    keys = ("gate_mode", "memory_backend", "ternary_projections", "stc_quantize", "stc_threshold", "target_sparsity",
            "forget_bias_init", "quant")
    assert [getattr(f, k) for k in keys] == [getattr(main.model, k) for k in keys]
    # Only the named pieces differ between variants; size, data and schedule are the twin's.
    assert all(v.trainer == twin.trainer and v.data == twin.data and v.optimizer == twin.optimizer for v in r.values())


def test_quality_diverged_flags_non_finite_and_rising_losses() -> None:
    assert not quality_diverged(2.0, 2.1, [4.0, 2.0])
    assert quality_diverged(math.nan, 2.0, [2.0])
    assert quality_diverged(2.0, math.inf, [2.0])
    assert quality_diverged(2.0, 3.1, [5.0, 2.0, 3.0])  # 3.1 > 1.5 x 2.0
    assert not quality_diverged(2.0, 3.0, [])  # nothing logged: the final loss is its own minimum


def test_bench_quality_tiny_ratios_json_and_determinism(tmp_path: Path) -> None:
    events: list[dict] = []
    a = bench_quality(steps=3, variants=["stc"], sets=TINY, work_dir=tmp_path, on_run=events.append)
    b = bench_quality(steps=3, variants=["stc"], sets=TINY, work_dir=tmp_path)
    assert [v["key"] for v in a["variants"]] == ["twin", "stc"]  # the twin runs even when not asked for
    for v in a["variants"]:
        run = v["runs"][0]
        assert math.isfinite(v["val_loss"]) and math.isfinite(run["train_loss"]) and run["steps"] == 3
        assert run["seconds"] > 0 and v["diverged"] is False
    twin, stc = a["variants"]
    assert twin["ratio"] == 1.0 and twin["time_ratio"] == 1.0
    assert stc["ratio"] == stc["val_loss"] / twin["val_loss"]
    assert stc["overrides"] == ["model.memory_backend=stc_sparse"]
    # Same seed, same data, same steps: the same losses, bit for bit.
    assert [(v["val_loss"], v["runs"][0]["train_loss"]) for v in a["variants"]] == \
        [(v["val_loss"], v["runs"][0]["train_loss"]) for v in b["variants"]]
    assert [(e["key"], e["done"]) for e in events] == [("twin", False), ("twin", True), ("stc", False), ("stc", True)]
    rep = json.loads(json.dumps(a))  # what --json writes
    assert rep["benchmark"] == "quality" and rep["machine"]["torch"] == torch.__version__
    s = rep["settings"]
    assert (s["steps"], s["seeds"], s["variants"], s["d_model"]) == (3, [1234], ["twin", "stc"], 16)
    assert set(rep["variants"][1]["runs"][0]) >= {"seed", "val_loss", "train_loss", "seconds", "diverged"}
    assert (tmp_path / "token-cache").is_dir()  # one shared cache, kept with --work-dir


def test_bench_quality_unknown_variant_names_the_keys() -> None:
    with pytest.raises(TernkitError, match="unknown variant 'stcc'; the variants are: twin, tern_absmean"):
        bench_quality(steps=3, variants=["stcc"], sets=TINY)
    with pytest.raises(TernkitError, match="use --steps"):
        quality_recipes(3, sets=["trainer.max_steps=5"])


def test_cli_bench_quality_table_json_and_bad_variant(tmp_path: Path, keep_threads) -> None:
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--steps", "2", "--variant", "twin", "--threads", "1", "--json", str(out)]
    for s in TINY:
        argv += ["--set", s]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert "Quality vs the float twin" in _flat(res.output) and "float twin" in res.output
    assert f"torch {torch.__version__}" in _flat(res.output)
    rep = json.loads(out.read_text())
    assert [v["key"] for v in rep["variants"]] == ["twin"] and rep["machine"]["torch_threads"] == 1
    bad = runner.invoke(app, ["bench", "quality", "--variant", "stcc"])
    assert bad.exit_code == 2
    assert "unknown variant 'stcc'; the variants are:" in _flat(bad.output) and "flagship" in bad.output
    assert "Traceback" not in bad.output


def test_bench_quality_records_a_run_the_guard_stopped_and_goes_on(tmp_path: Path, monkeypatch) -> None:
    import ternkit.train.run as run_mod
    from ternkit.train.module import DivergenceError

    real = run_mod.train

    def train(recipe, **kw):  # type: ignore[no-untyped-def]
        if recipe.model.memory_backend == "stc_sparse":
            raise DivergenceError("the training loss diverged: test")
        return real(recipe, **kw)

    monkeypatch.setattr(run_mod, "train", train)
    rep = bench_quality(steps=2, variants=["stc", "tgate"], sets=TINY, work_dir=tmp_path)
    by_key = {v["key"]: v for v in rep["variants"]}
    assert by_key["stc"]["diverged"] is True and "diverged" in by_key["stc"]["runs"][0]["stopped"]
    assert math.isnan(by_key["stc"]["val_loss"])
    assert by_key["tgate"]["diverged"] is False and math.isfinite(by_key["tgate"]["val_loss"])  # the next one ran
