"""Starting a run from another model's weights (``init_from`` / ``--init-from``): float twin -> ternary,
dense FFN -> MoE experts, exports as sources, shape mismatches refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_sentence_error, sets, snapshot, toy_train_argv

TWIN = ("model.gate_mode=sigmoid", "model.memory_backend=dense", "model.ternary_projections=[]")


@pytest.fixture
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _config(**model: object) -> dict:
    """A toy model config dict (the shapes of the toy runs) with ``model`` overrides."""
    from ternkit.models.config import ModelConfig

    base = dict(arch="xlstm_lm", d_model=32, n_blocks=1, n_heads=4, context_length=32, chunk_size=32, vocab_size=256)
    return ModelConfig(**{**base, **model}).to_dict()


def test_float_twin_checkpoint_starts_the_ternary_model(cli, in_tmp: Path, token_cache: Path) -> None:
    from ternkit.checkpoint import init_weights_from, load_checkpoint, model_from_checkpoint, model_from_config
    from ternkit.recipe import load_recipe

    assert cli(toy_train_argv(token_cache, 3, "name=twin", *TWIN)).code == 0
    twin_ckpt = in_tmp / "runs" / "twin" / "last.ckpt"
    twin = model_from_checkpoint(load_checkpoint(twin_ckpt))
    main_cfg = load_recipe("mlstm_stc", overrides=["model.n_blocks=1", "model.d_model=32", "model.n_heads=4",
                                                  "model.context_length=32", "model.chunk_size=32"]).model
    model = model_from_config(main_cfg.with_vocab(256).to_dict())
    rep = init_weights_from(model, twin_ckpt)
    layer, twin_layer = model.blocks[0].mlstm, twin.blocks[0].mlstm
    for proj in ("q_proj", "k_proj", "v_proj"):  # the twin's 4x4 blocks, as the full ternary matrix
        want = torch.block_diag(*getattr(twin_layer, proj).weight.detach())
        assert torch.equal(getattr(layer, proj).weight.detach(), want), proj
    for name in ("proj_up", "proj_down", "igate", "fgate"):
        assert torch.equal(getattr(layer, name).weight, getattr(twin_layer, name).weight), name
    assert torch.equal(model.embedding.weight, twin.embedding.weight)
    assert len(rep["converted"]) == 3 and rep["kind"] == "checkpoint"
    assert not [k for k in rep["kept_init"] if "quant" not in k]  # only the STC thresholds start fresh

    res = cli(toy_train_argv(token_cache, 2, "name=tern") + ["--init-from", str(twin_ckpt), "--json"])
    assert res.code == 0, res.text
    assert f"init_from {twin_ckpt} (checkpoint):" in res.err and "3 converted" in res.err
    summary = json.loads((in_tmp / "runs" / "tern" / "summary.json").read_text())
    assert summary["init_from"]["converted"] == rep["converted"]
    assert (in_tmp / "runs" / "tern" / "recipe.yaml").read_text().count(f"init_from: {twin_ckpt}") == 1

    # A resume continues from its own checkpoint: init_from is not applied again.
    res = cli(toy_train_argv(token_cache, 4, "name=tern") + ["--init-from", str(twin_ckpt), "--resume", "auto"])
    assert res.code == 0, res.text
    assert "init_from" not in res.err


@pytest.mark.parametrize("quant", [{"ternary_projections": []},
                                   {"ternary_projections": ["ffn"], "quant": {"scale": "per_row"}}],
                         ids=["float", "ternary-per-row"])
def test_dense_ffn_fills_every_moe_expert(quant: dict, tmp_path: Path) -> None:
    from ternkit import __version__
    from ternkit.checkpoint import init_weights_from, model_from_config

    dense = model_from_config(_config(ffn="dense", ffn_factor=2.0, **quant)).eval()
    ckpt = tmp_path / "dense.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in dense.state_dict().items()}, "global_step": 1,
                "ternkit": {"version": __version__, "model_config": dense.config.to_dict(), "run_info": {}}}, ckpt)
    moe = model_from_config(_config(ffn="moe", ffn_factor=2.0, moe={"experts": 4, "top_k": 2, "hidden": 64},
                                    **quant)).eval()
    rep = init_weights_from(moe, ckpt)
    w13, w2 = dense.blocks[0].ffn.w13.weight, dense.blocks[0].ffn.w2.weight
    for e in moe.blocks[0].ffn.experts:
        assert torch.equal(e.w1.weight, w13[:64]) and torch.equal(e.w3.weight, w13[64:])
        assert torch.equal(e.w2.weight, w2)
    assert any("router" in k for k in rep["kept_init"])
    # Identical experts and gates that sum to 1: the upcycled model computes the dense model's function (per-row
    # scales survive the split of W1|W3; one scale per tensor would not, since the experts keep W1 and W3 apart).
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.allclose(moe(x), dense(x), atol=1e-5)


def test_export_source_reproduces_the_export(cli, in_tmp: Path, toy_run: Path) -> None:
    from ternkit.checkpoint import init_weights_from, load_packed, model_from_config

    out = in_tmp / "export"
    assert cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(out)]).code == 0
    packed = load_packed(out)
    fresh = model_from_config(packed.config.to_dict())
    rep = init_weights_from(fresh, out)
    assert rep["kind"] == "export"
    for name, mod in packed.named_modules():
        if type(mod).__name__ == "PackedTernaryLinear":
            layer = fresh.get_submodule(name)
            assert torch.equal(layer.trits(), mod.trits()), name
            assert torch.allclose(layer.scale_of(), mod.alpha, rtol=1e-6), name
    x = torch.randint(0, packed.config.vocab_size, (1, 8))
    with torch.no_grad():  # the latent weights ternarize to the export's trits and scales: the same function
        assert torch.allclose(fresh.eval()(x), packed(x), atol=1e-4)


def test_shape_mismatch_is_refused_and_leaves_no_run_folder(cli, in_tmp: Path, token_cache: Path,
                                                            toy_run: Path) -> None:
    src = toy_run / "last.ckpt"
    before = snapshot([src])
    msg = assert_one_sentence_error(cli(toy_train_argv(token_cache, 2, "name=wide", "model.d_model=64")
                                        + ["--init-from", str(src)]))
    assert f"init_from {src}:" in msg and "differ in shape from this recipe's model" in msg
    assert "embedding.weight (256, 32) in last.ckpt vs (256, 64) here" in msg
    assert "make the recipe's model sizes match the source's" in msg
    assert snapshot([src]) == before
    assert not (in_tmp / "runs" / "wide").exists()


def test_missing_source_is_refused_before_anything_is_written(cli, in_tmp: Path, token_cache: Path) -> None:
    msg = assert_one_sentence_error(cli(toy_train_argv(token_cache, 2, "name=gone") + sets("init_from=nope.ckpt")))
    assert "init_from nope.ckpt does not exist" in msg and "or remove init_from" in msg
    assert not (in_tmp / "runs").exists()
