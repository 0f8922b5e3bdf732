"""`ternkit export --packed` (base3 and 2bit) and `ternkit stats` (--deadzone, --band, --stc, --moe) on the toy
checkpoints: files, safetensors metadata, sizes, load_packed logits vs the checkpoint, dead-zone JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import assert_one_sentence_error


@pytest.fixture(scope="module")
def exports(toy_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The toy checkpoint exported in both packings (through the Python API the CLI calls)."""
    from ternkit.export import export_packed

    base = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in ("base3", "2bit"):
        export_packed(toy_run / "last.ckpt", base / fmt, fmt=fmt)
        out[fmt] = base / fmt
    return out


def _flat_text(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("fmt", ["base3", "2bit"])
def test_export_writes_weights_config_tokenizer_and_metadata(fmt: str, exports: dict[str, Path], toy_run: Path) -> None:
    from safetensors import safe_open

    import ternkit

    d = exports[fmt]
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert (d / "tokenizer.json").read_bytes() == (toy_run / "tokenizer.json").read_bytes()
    with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
        packed = {k: fh.get_tensor(k) for k in keys if k.endswith(".packed")}
    assert meta["format"] == "pt" and meta["ternkit_version"] == ternkit.__version__ and meta["packing"] == fmt
    ckpt = torch.load(toy_run / "last.ckpt", map_location="cpu", weights_only=True)
    assert json.loads(meta["config"]) == ckpt["ternkit"]["model_config"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["packing"] == fmt and cfg["model"] == ckpt["ternkit"]["model_config"]
    assert packed and all(t.dtype == torch.uint8 for t in packed.values())
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] + ".packed" in keys for k in keys)  # no float trits


@pytest.mark.parametrize("fmt", ["base3", "2bit"])
def test_load_packed_logits_equal_checkpoint_ternarized_forward(fmt: str, exports: dict[str, Path],
                                                                toy_run: Path) -> None:
    import ternkit
    from ternkit.export import load_model
    from ternkit.modules.packed import PackedTernaryLinear

    ref, _ = load_model(toy_run / "last.ckpt")
    packed = ternkit.load_packed(exports[fmt])
    assert not packed.training
    layers = [m for m in packed.modules() if isinstance(m, PackedTernaryLinear)]
    ref_layers = {n: m for n, m in ref.named_modules() if type(m).__name__ == "TernaryLinear"}
    assert len(layers) == len(ref_layers) >= 3  # up, q/k/v and down of the one block
    for name, m in packed.named_modules():
        if isinstance(m, PackedTernaryLinear):
            assert torch.equal(m.trits(), ref_layers[name].trits()), name
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 40), generator=g)
    with torch.no_grad():
        diff = (ref(tokens).float() - packed(tokens).float()).abs().max().item()
    assert diff <= 1e-5


def test_export_cli_table_check_and_force(cli, toy_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    res = cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(out), "--check"])
    assert res.code == 0, res.text
    m = re.search(r"max \|logit diff\| vs checkpoint = ([0-9.e+-]+)", res.out)
    assert m and float(m.group(1)) <= 1e-5
    assert re.search(r"bits per ternary weight\s*\S\s*1\.6\d\d", res.out), res.out  # all layer sizes divide by 5
    ratio = float(re.search(r"ratio to fp16\s*\S\s*([\d.]+)x", res.out).group(1))
    from ternkit.export import load_model

    model, _ = load_model(toy_run / "last.ckpt")
    fp16 = 2 * sum(p.numel() for p in model.parameters())
    assert ratio == pytest.approx(fp16 / (out / "model.safetensors").stat().st_size, abs=0.01)
    assert ratio > 1.0
    from ternkit.modules.linear import latent_ternary_layers

    # The main job's per-row scales travel with the trits and are counted: one float per output row.
    rows = sum(m.out_features for m in latent_ternary_layers(model).values())
    assert re.search(rf"ternary scales\s*\S\s*[\d.]+ MB \({rows:,} floats", _flat_text(res.out)), res.out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(out), "--format", "2bit"])
    assert "--force" in assert_one_sentence_error(refused)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    forced = cli(["export", str(toy_run / "last.ckpt"), "--packed", "-o", str(out), "--format", "2bit", "--force"])
    assert forced.code == 0, forced.text
    assert json.loads((out / "config.json").read_text())["packing"] == "2bit"


def _untrained_checkpoint(path: Path, **cfg: object) -> Path:
    """A ternkit checkpoint of a freshly initialised model (no training needed to test packing sizes)."""
    from ternkit.train.module import TernkitLM

    torch.manual_seed(0)
    module = TernkitLM({"vocab_size": 256, "n_blocks": 1, "context_length": 32, **cfg}, {"lr": 1e-3}, {}, 1)
    ckpt = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _layer_rows(out: str) -> dict[str, tuple[int, float]]:
    """layer -> (K, bits per weight) from the export command's per-layer table."""
    return {name: (int(k), float(bits)) for name, k, bits in
            re.findall(r"(blocks\.\d+\.\S+)\s*\S\s*\d+x(\d+)\s*\S\s*([\d.]+)", out)}


def test_export_bits_per_weight_2bit_at_k_multiple_of_128(cli, tmp_path: Path) -> None:
    # d_model 64, inner 128: q/k/v and down read K=128 (one full 2-bit block), up reads K=64 (half a block).
    ckpt = _untrained_checkpoint(tmp_path / "m.ckpt", d_model=64, n_heads=4, ternary=["up", "qkv", "down"])
    res = cli(["export", str(ckpt), "--packed", "-o", str(tmp_path / "e2"), "--format", "2bit"])
    assert res.code == 0, res.text
    rows = _layer_rows(res.out)
    assert len(rows) >= 3, res.out
    for layer, (k, bits) in rows.items():
        assert bits == pytest.approx(2.0 if k % 128 == 0 else 8.0 * 32 * -(-k // 128) / k, abs=1e-3), layer
    assert any(k == 128 for k, _ in rows.values())
    res3 = cli(["export", str(ckpt), "--packed", "-o", str(tmp_path / "e3"), "--format", "base3", "--check"])
    assert res3.code == 0, res3.text
    for layer, (_, bits) in _layer_rows(res3.out).items():
        assert bits == pytest.approx(1.6, abs=1e-3), layer  # every layer's size is a multiple of 5 up to padding
    assert re.search(r"bits per ternary weight\s*\S\s*1\.600", res3.out), res3.out


def test_export_and_stats_of_integer_state_model(cli, tmp_path: Path) -> None:
    """Group-scale (integer-state) layers travel as their own packed buffers and rebuild exactly."""
    ckpt = _untrained_checkpoint(tmp_path / "g.ckpt", d_model=32, n_heads=4, ternary=["up", "qkv", "down"],
                                 ternary_scale="group")
    res = cli(["export", str(ckpt), "--packed", "-o", str(tmp_path / "eg"), "--check"])
    assert res.code == 0, res.text
    m = re.search(r"max \|logit diff\| vs checkpoint = ([0-9.e+-]+)", res.out)
    assert m and float(m.group(1)) <= 1e-5
    rows = _layer_rows(res.out)
    # base-3 pads each tensor to whole bytes of 5 trits: 64x64 -> 820 bytes = 1.6016 bits.
    assert len(rows) >= 3 and all(bits == pytest.approx(1.6, abs=3e-3) for _, bits in rows.values())
    for src in (ckpt, tmp_path / "eg"):
        rep = _stats_json(cli, str(src), "--deadzone")["deadzone"]
        assert rep["layers"] and all(d["kind"] == "integer" for d in rep["layers"].values())
        assert rep["totals"]["frac_neg"] + rep["totals"]["frac_zero"] + rep["totals"]["frac_pos"] == pytest.approx(1.0)


def _stats_json(cli, *argv: str) -> dict:
    res = cli(["stats", *argv, "--json"])
    assert res.code == 0, res.text
    return json.loads(res.out)


def test_stats_deadzone_on_checkpoint_and_export(cli, toy_run: Path, exports: dict[str, Path]) -> None:
    ck = _stats_json(cli, str(toy_run / "last.ckpt"), "--deadzone")["deadzone"]
    assert len(ck["layers"]) >= 3
    for name, d in ck["layers"].items():
        assert d["frac_neg"] + d["frac_zero"] + d["frac_pos"] == pytest.approx(1.0, abs=1e-9), name
        assert 0.0 < d["frac_boundary"] < 1.0 and d["alpha"] > 0
    tot = ck["totals"]
    assert tot["numel"] == sum(d["numel"] for d in ck["layers"].values())
    assert tot["frac_neg"] + tot["frac_zero"] + tot["frac_pos"] == pytest.approx(1.0, abs=1e-9)
    wide = _stats_json(cli, str(toy_run / "last.ckpt"), "--deadzone", "--band", "0.3")["deadzone"]
    assert wide["band"] == 0.3
    assert wide["totals"]["frac_boundary"] > tot["frac_boundary"]  # a wider band holds more weights
    # The export holds only trits: same trit fractions per layer, and no weight sits near a rounding edge.
    ex = _stats_json(cli, str(exports["2bit"]), "--deadzone")
    assert ex["source"]["kind"] == "export"
    for name, d in ex["deadzone"]["layers"].items():
        for key in ("frac_neg", "frac_zero", "frac_pos"):
            assert d[key] == pytest.approx(ck["layers"][name][key], abs=1e-12), (name, key)
        assert d["frac_boundary"] == 0.0
    table = cli(["stats", str(toy_run / "last.ckpt"), "--deadzone"])
    assert table.code == 0 and "total" in table.out and "deep 0" in table.out and "alpha" in table.out


def _head_threshold_run(toy_run: Path, out_dir: Path) -> Path:
    """The toy run's model with STC on keys and values and per-head thresholds, tau set by one training forward."""
    from ternkit.models.config import ModelConfig
    from ternkit.train.module import TernkitLM

    ckpt = torch.load(toy_run / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = ModelConfig.from_dict(ckpt["ternkit"]["model_config"])
    torch.manual_seed(0)
    module = TernkitLM({**cfg.to_dict(), "stc_quantize": "kv", "stc_threshold": "head"}, {"lr": 1e-3}, {}, 1,
                       run_info={"run_dir": str(toy_run)})
    module.model.train()
    with torch.no_grad():
        module.model(torch.randint(0, cfg.vocab_size, (2, 32)))
    out = {"state_dict": module.state_dict(), "global_step": 1}
    module.on_save_checkpoint(out)
    path = out_dir / "head_threshold.ckpt"
    torch.save(out, path)
    return path


def test_stats_stc_on_stc_model(cli, toy_run: Path, tmp_path: Path) -> None:
    rep = _stats_json(cli, str(toy_run / "last.ckpt"), "--stc")
    (blk,) = rep["stc"]
    # The main job quantizes keys only, with one threshold per key vector: exactly 75% zeros.
    assert blk["block"] == 0 and blk["threshold"] == "vector" and blk["tau_k"] is None and blk["tau_v"] is None
    assert blk["zero_fraction_k"] == pytest.approx(0.75) and blk["zero_fraction_v"] is None
    assert 0.0 < blk["skip_fraction"] <= 1.0
    head = _stats_json(cli, str(_head_threshold_run(toy_run, tmp_path)), "--stc")["stc"][0]
    assert len(head["tau_k"]) == 4 and all(t > 0 for t in head["tau_k"] + head["tau_v"])
    # The per-head quantizer aims at 75% zeros; after a few steps on a probe batch it is in that region.
    assert 0.4 < head["zero_fraction_k"] < 0.95


def test_stats_moe_on_moe_model_and_refused_elsewhere(cli, toy_moe_run: Path, toy_run: Path) -> None:
    rep = _stats_json(cli, str(toy_moe_run / "last.ckpt"), "--moe")
    (blk,) = rep["moe"]
    loads = blk["tokens_per_expert"]
    assert len(loads) == 4 and sum(loads) == 2 * 4 * 32  # top-2 of 4 experts, probe batch of 4 x 32 tokens
    assert blk["load_imbalance"] >= 1.0
    msg = assert_one_sentence_error(cli(["stats", str(toy_run / "last.ckpt"), "--moe"]))
    assert "no MoE" in msg


def test_a_flipped_bit_in_an_export_is_refused_by_its_content_hash(cli, exports: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from conftest import assert_one_sentence_error, snapshot

    from ternkit.export import content_digest, load_packed

    d = tmp_path / "flipped"
    shutil.copytree(exports["2bit"], d)
    cfg = json.loads((d / "config.json").read_text())
    from safetensors.torch import load_file

    assert cfg["content_sha256"] == content_digest(load_file(str(d / "model.safetensors")))
    load_packed(d)  # intact: loads
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit in the last tensor's bytes (the header is at the front)
    weights.write_bytes(bytes(data))
    before = snapshot([weights, d / "config.json"])
    for argv in (["generate", str(d), "def ", "--max-new-tokens", "4"], ["stats", str(d)]):
        msg = assert_one_sentence_error(cli(argv))
        assert "failed its integrity check" in msg and "export the checkpoint again" in msg, msg
    assert snapshot(list(before)) == before
