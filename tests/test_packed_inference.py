"""Packed inference: pack_model's ternary_linear + stc_write path equals the float model it came from."""

from __future__ import annotations

import copy

import pytest
import torch

from ternkit.export import pack_model
from ternkit.models.config import XLSTMLMConfig
from ternkit.models.lm import XLSTMLM
from ternkit.modules.linear import TernaryLinear
from ternkit.modules.packed import PackedTernaryLinear


def _model(act_bits: int | None, scale: str, seed: int = 0, stc: bool = True) -> XLSTMLM:
    torch.manual_seed(seed)
    cfg = XLSTMLMConfig(vocab_size=61, d_model=64, n_blocks=2, n_heads=2, chunk_size=16,
                        gate_mode="ternary" if stc else "sigmoid", memory_backend="stc_sparse" if stc else "dense",
                        ternary_projections=["up", "qkv", "down", "ffn"], ffn="ternary",
                        quant={"scale": scale, "act_bits": act_bits}, tie_embeddings=False)
    m = XLSTMLM(cfg)
    with torch.no_grad():
        m(torch.randint(0, 61, (4, 32)))  # STC thresholds from a first training-mode batch
    return m.eval()


@pytest.mark.parametrize("scale", ["absmean", "per_row", "lsq"])
def test_packed_logits_match_float_model(scale: str) -> None:
    # Without STC thresholds or int8 rounding the model is a continuous function of the linear
    # outputs, so the kernel's other summation order may only move the logits by float noise.
    ref = _model(None, scale, stc=False)
    packed = pack_model(copy.deepcopy(ref), fmt="2bit")
    n_packed = sum(isinstance(m, PackedTernaryLinear) for m in packed.modules())
    assert n_packed == sum(isinstance(m, TernaryLinear) for m in ref.modules()) > 0 and not any(isinstance(m, TernaryLinear) for m in packed.modules())
    tokens = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        diff = (ref(tokens) - packed(tokens)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("act_bits,scale", [(None, "absmean"), (8, "absmean"), (8, "per_row"), (None, "lsq")])
def test_packed_greedy_equals_float_greedy(act_bits: int | None, scale: str) -> None:
    # STC thresholds, the ternary gate and int8 rounding are discontinuous: a 1e-7 difference in a
    # linear output can flip one entry that sits on a threshold. Same seeds, same machine kind:
    # these cases decode identically (a rare seed diverges after some tokens; see the issue note).
    ref = _model(act_bits, scale)
    packed = pack_model(copy.deepcopy(ref), fmt="2bit")
    tokens = torch.randint(0, 61, (2, 24))
    prompt = tokens[:, :8]
    # Greedy decoding (prefill + constant-memory steps): the packed path writes the STC memory with
    # stc_write in place, the float path with the same op on a copy; the tokens must agree.
    out_ref = ref.generate(prompt, max_new_tokens=24, greedy=True)
    out_packed = packed.generate(prompt, max_new_tokens=24, greedy=True)
    assert torch.equal(out_ref, out_packed)
    assert 0.0 < packed.skip_fraction() < 1.0


def test_packed_base3_layer_repacks_once_and_matches() -> None:
    torch.manual_seed(1)
    lin = TernaryLinear(200, 37, scale="per_row")
    trits, alpha = lin.trits(), lin.scale_of().detach().reshape(37, 1)
    b3 = PackedTernaryLinear.from_trits(trits, alpha, fmt="base3")
    x = torch.randn(5, 200)
    with torch.no_grad():
        y_ref = lin(x)
        y = b3(x)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    cache = b3.packed_2bit()
    assert cache.dtype == torch.uint8 and cache.shape == (37, 64)  # ceil(200/128) * 32 bytes per row
    assert b3.packed_2bit() is cache
