"""One model config from recipe to checkpoint to export: the schema walk, and older formats still load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ternkit.errors import TernkitError
from ternkit.models.config import ModelConfig, MoEConfig, migrate_model_config
from ternkit.quant.spec import TernarySpec
from ternkit.recipe import Recipe, recipe_from_dict
from ternkit.schema import model_in

FIXTURES = Path(__file__).parent / "fixtures" / "format_v0"


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """{dotted path: field default} of every leaf field of a pydantic model class, nested sections walked."""
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        sub = model_in(info.annotation)
        if sub is not None:
            out.update(_leaf_paths(sub, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info.get_default(call_default_factory=True)
    return out


def test_recipe_model_section_is_the_model_config() -> None:
    assert Recipe.model_fields["model"].annotation is ModelConfig
    assert ModelConfig.model_fields["moe"].annotation is MoEConfig
    assert ModelConfig.model_fields["quant"].annotation is TernarySpec
    # Every model setting is a recipe key under model., with one default, and the checkpoint stores exactly those.
    recipe_model = {k.removeprefix("model."): v for k, v in _leaf_paths(Recipe).items() if k.startswith("model.")}
    assert recipe_model == _leaf_paths(ModelConfig)
    stored = ModelConfig(vocab_size=40).to_dict()

    def flat(d: dict[str, Any], prefix: str = "") -> set[str]:
        keys = set()
        for k, v in d.items():
            keys |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "extra" else {prefix + k}
        return keys

    assert flat(stored) == set(_leaf_paths(ModelConfig))


def test_a_recipe_setting_reaches_the_model_and_the_checkpoint_unchanged() -> None:
    from ternkit.models.lm import XLSTMLM
    from ternkit.train.module import TernkitLM

    sets = ["model.d_model=32", "model.n_blocks=1", "model.n_heads=2", "model.quant.scale=lsq", "quant.act_bits=8",
            "model.ffn=moe", "model.moe.experts=3", "model.moe.top_k=2", "model.moe.balancing=aux_free",
            "model.gate_mode=ternary", "model.forget_bias_init=[0.5, 1.0]"]
    r = recipe_from_dict({}, overrides=sets)
    cfg = r.model.with_vocab(48)
    module = TernkitLM(cfg.to_dict(), r.optimizer, r.schedule, 1)
    ckpt: dict[str, Any] = {}
    module.on_save_checkpoint(ckpt)
    stored = ckpt["ternkit"]["model_config"]
    assert stored == cfg.to_dict() == module.model.config.to_dict()
    assert stored["quant"] == {"scale": "lsq", "act_bits": 8, "group_size": 32}
    # The aux-loss default follows the balancing everywhere: recipe, model and checkpoint alike.
    assert r.model.moe.aux_loss_weight == stored["moe"]["aux_loss_weight"] == 0.0
    assert isinstance(module.model, XLSTMLM) and module.model.blocks[0].ffn.spec == cfg.quant
    # The training schedule comes from the recipe's own defaults, not a second copy of them.
    assert module.sched_cfg.warmup_steps == Recipe().schedule.warmup_steps


def test_legacy_top_level_quant_lands_in_model_quant() -> None:
    r = recipe_from_dict({"quant": {"scale": "group", "group_size": 16}})
    assert r.model.quant.scale == "group" and r.quant is r.model.quant
    assert "quant" not in r.to_dict() and r.to_dict()["model"]["quant"]["group_size"] == 16
    with pytest.raises(TernkitError, match="keep one"):
        recipe_from_dict({"quant": {"scale": "group"}, "model": {"quant": {"scale": "lsq"}}})
    same = recipe_from_dict({"quant": {"scale": "group"}, "model": {"quant": {"scale": "group", "group_size": 32}}})
    assert same.model.quant.scale == "group"  # the same setting written twice is no conflict
    with pytest.raises(TernkitError, match="did you mean 'model.quant.scale'"):
        recipe_from_dict({"trainer": {"scale": "group"}})


def test_migrate_model_config_maps_the_old_flat_keys() -> None:
    old = {"vocab_size": 32, "ternary": ["up", "qkv"], "ternary_scale": "group", "ternary_group_size": 8,
           "act_bits": 8, "ffn": "moe", "moe": {"experts": 4, "top_k": 2, "hidden": 8, "ternary": True,
                                                "ternary_scale": "group", "act_bits": 8, "ternary_group_size": 8}}
    new = migrate_model_config(old)
    assert new["ternary_projections"] == ["up", "qkv", "ffn"]  # ternary experts were the old MoE default
    assert new["quant"] == {"scale": "group", "group_size": 8, "act_bits": 8}
    assert new["moe"] == {"experts": 4, "top_k": 2, "hidden": 8}
    assert (new["n_blocks"], new["context_length"], new["tie_embeddings"]) == (2, 256, False)  # old defaults
    assert old["ternary"] == ["up", "qkv"]  # the caller's dict is untouched
    cfg = ModelConfig.from_dict(old)
    assert migrate_model_config(cfg.to_dict()) == cfg.to_dict()  # today's form passes through
    mixed = dict(old, ffn=["moe", "dense"], n_blocks=2)
    with pytest.raises(TernkitError, match="cannot express"):
        migrate_model_config(mixed)
    # An old moe dict stored only what the user set: the old expert width default (256) comes back,
    # float experts stay float, and expert settings the model-level quant cannot hold are refused.
    base = {"vocab_size": 32, "d_model": 32, "n_heads": 2, "ffn": "moe"}
    assert ModelConfig.from_dict({**base, "moe": {}, "ternary": ["up"]}).moe.hidden == 256
    assert ModelConfig.from_dict({**base, "moe": {"ternary": False}, "ternary": ["up", "ffn"]}).ternary == ("up",)
    with pytest.raises(TernkitError, match="cannot express"):
        ModelConfig.from_dict({**base, "moe": {"ternary_scale": "per_row"}, "ternary": ["up"]})
    from ternkit.models.lm import XLSTMLM

    assert "spec=absmean" in repr(XLSTMLM(ModelConfig.from_dict({**base, "moe": {}, "ternary": ["up"]})))


@pytest.mark.parametrize("name", ["mlstm_stc", "moe"])
def test_checkpoints_and_exports_of_the_old_format_give_the_same_logits(name: str) -> None:
    """Fixtures written by ternkit before the config was unified (see tests/fixtures/format_v0)."""
    from ternkit.export import load_model, load_packed

    expected = json.loads((FIXTURES / "expected_logits.json").read_text())
    tokens = torch.tensor(expected["tokens"])
    model, info = load_model(FIXTURES / f"{name}.ckpt")
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, torch.tensor(expected["logits"][name]["checkpoint"]), atol=1e-6, rtol=0)
    packed = load_packed(FIXTURES / f"{name}_export")
    with torch.no_grad():
        got_packed = packed(tokens)
    torch.testing.assert_close(got_packed, torch.tensor(expected["logits"][name]["export"]), atol=1e-5, rtol=0)
    assert model.config == packed.config and "ternary_projections" in model.config.to_dict()
