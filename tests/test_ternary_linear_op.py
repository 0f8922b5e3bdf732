"""ternary_linear on packed 2-bit weights: the twin against a float reference, the compiled op (AVX2 and
scalar paths, CUDA when present) against the twin, opcheck, shape errors and the standalone nvcc build."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ternkit.errors import TernkitError
from ternkit.ops import compiled
from ternkit.ops.ternary_linear import compiled_available, ternary_linear, ternary_linear_reference
from ternkit.quant.packing import pack_2bit, unpack_trits
from ternkit.quant.ternarize import act_quant_8bit

KS = (32, 100, 128, 300, 1024)
N = 5


def make_case(k: int, kind: str, n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(packed trits (n, ...), scale, group_size, float weight (n, k)) for a scale kind: tensor, row or gNN."""
    g = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    if kind == "tensor":
        scale, gs = torch.rand(1, generator=g) + 0.5, 0
        full = scale.expand(n, k)
    elif kind == "row":
        scale, gs = torch.rand(n, 1, generator=g) + 0.5, 0
        full = scale.expand(n, k)
    else:
        gs = int(kind[1:])
        scale = torch.rand(n, -(-k // gs), generator=g) + 0.5
        full = scale.repeat_interleave(gs, dim=1)[:, :k]
    packed = pack_2bit(trits)
    w = unpack_trits(packed, "2bit", (n, k)).float() * full
    return packed, scale, gs, w


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x| @ |w|^T: the size of the terms behind each output, for rounding tolerances."""
    return F.linear(x.abs(), w.abs()) + 1e-6


@pytest.mark.parametrize("kind", ["tensor", "row", "g32", "g64", "g128"])
@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("k", KS)
def test_twin_matches_float_reference(k: int, act_bits: int | None, kind: str) -> None:
    packed, scale, gs, w = make_case(k, kind)
    for m in (1, 3, 17):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = ternary_linear_reference(x, packed, scale, k, group_size=gs, act_bits=act_bits)
        xr = act_quant_8bit(x) if act_bits == 8 else x
        ref = F.linear(xr, w)
        assert y.shape == (m, N)
        err = ((y - ref).abs() / bound(xr, w)).max().item()
        assert err < 1e-5, (m, err)


def test_twin_keeps_leading_dims_dtype_bias_and_grad() -> None:
    packed, scale, gs, w = make_case(100, "row")
    x = torch.randn(2, 3, 100, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N)
    y = ternary_linear(x, packed, scale, 100, bias=bias)  # needs grad: the differentiable twin runs
    assert y.shape == (2, 3, N) and y.dtype == torch.float64
    torch.testing.assert_close(y.float(), F.linear(x.float(), w, bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad.float(), w.sum(0).expand(2, 3, 100), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 99)), "last dim"),
    (dict(w=torch.zeros(N, 64, dtype=torch.uint8)), "w_packed"),
    (dict(w=torch.zeros(N, 32, dtype=torch.int8)), "w_packed"),
    (dict(scale=torch.ones(N + 1)), "per row"),
    (dict(scale=torch.ones(N, 3), gs=48), "multiple of 32"),
    (dict(scale=torch.ones(N, 3), gs=32), r"\(5, 4\)"),
    (dict(act_bits=4), "act_bits"),
    (dict(bias=torch.zeros(N + 1)), "bias"),
])
def test_bad_arguments_raise_one_sentence(bad: dict, match: str) -> None:
    packed, scale, gs, _ = make_case(100, "row")
    args = dict(x=torch.randn(2, 100), w=packed, scale=scale, gs=gs, act_bits=None, bias=None) | bad
    for fn in (ternary_linear, ternary_linear_reference):
        with pytest.raises(TernkitError, match=match) as info:
            fn(args["x"], args["w"], args["scale"], 100, group_size=args["gs"], act_bits=args["act_bits"],
               bias=args["bias"])
        assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


# ---------------------------------------------------------------- compiled op

@pytest.fixture(scope="module")
def op_built() -> None:
    if not compiled_available("cpu"):
        st = {s.name: s for s in compiled.status()}.get("ternary_linear")
        pytest.skip(f"compiled ternary_linear unavailable: {st.detail if st else 'not built'}")


def check_against_twin(y: torch.Tensor, yr: torch.Tensor, x: torch.Tensor, w: torch.Tensor, act_bits: int | None,
                       single_group: bool) -> None:
    if act_bits == 8 and single_group:
        assert torch.equal(y, yr), (y - yr).abs().max()  # one product and one division: bit-exact
    elif act_bits == 8:
        # exact integer sums; only the group epilogue could round differently (an FMA): 1 ulp per group
        torch.testing.assert_close(y, yr, rtol=0, atol=float((bound(x, w) * 2e-7 * x.shape[-1] / 32).max()))
    else:
        err = ((y - yr).abs() / bound(x, w)).max().item()
        assert err < 2e-6, err


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("kind", ["tensor", "row", "g32", "g96", "g128", "g256"])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_compiled_matches_twin(op_built: None, monkeypatch: pytest.MonkeyPatch, isa: str, kind: str,
                               act_bits: int | None) -> None:
    if isa == "scalar":
        monkeypatch.setenv("TERNKIT_ISA", "scalar")
    else:
        monkeypatch.delenv("TERNKIT_ISA", raising=False)
    for k in KS:
        packed, scale, gs, w = make_case(k, kind, n=7, seed=k)
        for m in (1, 3, 17):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)) * 3
            y = torch.ops.ternkit.ternary_linear(x, packed, scale.contiguous(), k, gs, act_bits or 0)
            yr = ternary_linear_reference(x, packed, scale, k, group_size=gs, act_bits=act_bits)
            check_against_twin(y, yr, x, w, act_bits, gs == 0)


def test_avx2_and_scalar_paths_agree_exactly_on_int8(op_built: None, monkeypatch: pytest.MonkeyPatch) -> None:
    packed, scale, gs, _ = make_case(1000, "g32", n=33, seed=3)
    x = torch.randn(9, 1000)
    monkeypatch.setenv("TERNKIT_ISA", "scalar")
    y_scalar = torch.ops.ternkit.ternary_linear(x, packed, scale, 1000, gs, 8)
    monkeypatch.delenv("TERNKIT_ISA")
    y_auto = torch.ops.ternkit.ternary_linear(x, packed, scale, 1000, gs, 8)
    assert torch.equal(y_scalar, y_auto)


def test_wrapper_uses_compiled_op_with_bias_dtype_and_empty_batch(op_built: None) -> None:
    packed, scale, gs, w = make_case(300, "g128", n=9)
    x = torch.randn(2, 4, 300).to(torch.bfloat16)
    bias = torch.randn(9)
    with torch.no_grad():
        y = ternary_linear(x, packed, scale, 300, group_size=gs, act_bits=8, bias=bias)
    yr = ternary_linear_reference(x, packed, scale, 300, group_size=gs, act_bits=8, bias=bias)
    assert y.shape == (2, 4, 9) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), rtol=1e-2, atol=1e-2)
    empty = ternary_linear(torch.randn(0, 300), packed, scale, 300, group_size=gs, act_bits=8)
    assert empty.shape == (0, 9)
    z = torch.ops.ternkit.ternary_linear(torch.randn(0, 300), packed, scale, 300, gs, 8)
    assert z.shape == (0, 9)


def test_compiled_op_rejects_bad_shapes(op_built: None) -> None:
    packed, scale, gs, _ = make_case(100, "row")
    with pytest.raises(RuntimeError, match="w_packed"):
        torch.ops.ternkit.ternary_linear(torch.randn(2, 200), packed, scale, 200, 0, 8)
    with pytest.raises(RuntimeError, match="act_bits"):
        torch.ops.ternkit.ternary_linear(torch.randn(2, 100), packed, scale, 100, 0, 4)


@pytest.mark.parametrize("act_bits", [0, 8])
def test_opcheck(op_built: None, act_bits: int) -> None:
    packed, scale, gs, _ = make_case(100, "g32", n=3)
    x = torch.randn(2, 100)
    torch.library.opcheck(torch.ops.ternkit.ternary_linear.default, (x, packed, scale, 100, gs, act_bits))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["tensor", "row", "g32", "g96"])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_cuda_matches_twin(kind: str, act_bits: int | None) -> None:
    if not compiled_available("cuda"):
        pytest.skip("compiled ternary_linear has no CUDA kernel in this build")
    for k in (100, 1024):
        packed, scale, gs, w = make_case(k, kind, n=37, seed=k)
        x = torch.randn(5, k) * 2
        yr = ternary_linear_reference(x, packed, scale, k, group_size=gs, act_bits=act_bits)
        with torch.no_grad():
            y = ternary_linear(x.cuda(), packed.cuda(), scale.cuda(), k, group_size=gs, act_bits=act_bits).cpu()
        check_against_twin(y, yr, x, w, act_bits, gs == 0)
