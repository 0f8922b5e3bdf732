"""ternkit::stc_write (compiled, CPU AVX2 + scalar, CUDA) and its pure-torch twin vs the dense mLSTM memory update."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from ternkit.errors import TernkitError
from ternkit.ops import stc_write as stc_write_mod
from ternkit.ops.stc_write import (STAT_KEYS, compiled_available, skip_fraction, sparse_memory_write, stc_write,
                                   stc_write_reference)

DENSITIES = (1.0, 0.5, 0.1, 0.0)
F_VALUES = (1.0, -1.0, 0.0, 0.7)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.fixture(scope="module")
def op():
    """The compiled op (built once per cache); skipped only where no build can be expected."""
    if os.environ.get("TERNKIT_NO_EXT", "") not in ("", "0") or not _has_cxx():
        pytest.skip("compiled ops disabled (TERNKIT_NO_EXT) or no C++ compiler")
    assert compiled_available("cpu"), "ternkit::stc_write failed to build; see ternkit.ops.compiled.status()"
    return torch.ops.ternkit.stc_write


def _ternary(shape: tuple[int, ...], density: float, alpha: float = 0.37) -> torch.Tensor:
    """alpha * {-1, 0, +1} with about `density` non-zeros (exactly 0 / all for density 0 / 1)."""
    keep = torch.rand(shape) < density
    return alpha * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0) * keep


def _case(B: int, NH: int, DK: int, DV: int, density: float, f_value: float, mixed_f: bool = True,
          ternary: bool = True) -> tuple[torch.Tensor, ...]:
    C = torch.randn(B, NH, DK, DV)
    C[C.abs() < 0.05] = -0.0  # signed zeros must survive where the write skips them
    n = torch.randn(B, NH, DK)
    if ternary:
        k, v = _ternary((B, NH, DK), density), _ternary((B, NH, DV), density, 0.81)
    else:
        k = torch.randn(B, NH, DK) * (torch.rand(B, NH, DK) < density)
        v = torch.randn(B, NH, DV) * (torch.rand(B, NH, DV) < density)
    i = torch.rand(B, NH) * 1.5 + 0.1
    f = torch.full((B, NH), f_value)
    if mixed_f:
        f.view(-1)[0] = 1.0  # every call mixes a kept head with the others
        f.view(-1)[-1] = 0.7 if f_value == 1.0 else f_value
    return C, n, k, v, i, f


def _dense(C, n, k, v, i, f):
    C_new = f[..., None, None] * C + i[..., None, None] * (k.unsqueeze(-1) * v.unsqueeze(-2))
    return C_new, f[..., None] * n + i[..., None] * k


def _expected_counts(C, k, v, f) -> dict[str, int]:
    B, NH, DK, DV = C.shape
    written = int(((k != 0).sum(-1) * (v != 0).sum(-1)).sum())
    return {"total": C.numel(), "written": written, "decayed": int((f != 1).sum()) * DK * DV}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("f_value", F_VALUES)
def test_twin_matches_dense_and_sparse_memory_write(density: float, f_value: float) -> None:
    torch.manual_seed(1)
    # DK != DV against the dense form.
    C, n, k, v, i, f = _case(2, 3, 12, 20, density, f_value)
    C_d, n_d = _dense(C, n, k, v, i, f)
    C1, n1 = C.clone(), n.clone()
    stats = stc_write_reference(C1, n1, k, v, i, f)
    assert torch.equal(C1, C_d) and torch.equal(n1, n_d)
    assert stats == _expected_counts(C, k, v, f)
    # Square heads against the loop reference of ops/stc.py (note its (f', i') argument order).
    C, n, k, v, i, f = _case(2, 3, 16, 16, density, f_value, ternary=False)
    C_s, n_s, st_s = sparse_memory_write(C, n, k, v, i, f)
    C1, n1 = C.clone(), n.clone()
    stats = stc_write_reference(C1, n1, k, v, i, f)
    assert torch.equal(C1, C_s) and torch.equal(n1, n_s)
    assert stats == st_s


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("shape", [(2, 3, 24, 40), (1, 2, 67, 133), (1, 4, 128, 256)])
def test_compiled_matches_twin_bit_for_bit(op, monkeypatch: pytest.MonkeyPatch, isa: str,
                                           shape: tuple[int, int, int, int]) -> None:
    if isa == "scalar":
        monkeypatch.setenv("TERNKIT_ISA", "scalar")
    else:
        monkeypatch.delenv("TERNKIT_ISA", raising=False)
    torch.manual_seed(2)
    for density in (*DENSITIES, 0.05, 0.25):
        for f_value in F_VALUES:
            C, n, k, v, i, f = _case(*shape, density, f_value, ternary=density != 0.25)
            C1, n1 = C.clone(), n.clone()
            st1 = stc_write_reference(C1, n1, k, v, i, f)
            C2, n2 = C.clone(), n.clone()
            counts = op(C2, n2, k, v, i, f)
            assert counts.dtype == torch.int64 and counts.shape == (2,)
            assert counts.tolist() == [st1["written"], st1["decayed"]], (density, f_value)
            assert torch.equal(_bits(C2), _bits(C1)), (density, f_value)
            assert torch.equal(_bits(n2), _bits(n1)), (density, f_value)
            C_d, n_d = _dense(C, n, k, v, i, f)
            assert torch.equal(C2, C_d) and torch.equal(n2, n_d), (density, f_value)


def test_compiled_large_memory_matches_twin(op, monkeypatch: pytest.MonkeyPatch) -> None:
    # C over 1 MiB takes the kernel's prefetching paths (per column, per line, and blocks);
    # DV = 523 leaves a 3-column tail after the last 8-column block.
    monkeypatch.delenv("TERNKIT_ISA", raising=False)
    torch.manual_seed(7)
    for density in (0.02, 0.1, 0.35):
        C, n, k, v, i, f = _case(1, 2, 300, 523, density, 1.0)
        v[..., -2] = 0.5  # a non-zero in the tail
        C1, n1 = C.clone(), n.clone()
        st1 = stc_write_reference(C1, n1, k, v, i, f)
        C2, n2 = C.clone(), n.clone()
        assert op(C2, n2, k, v, i, f).tolist() == [st1["written"], st1["decayed"]], density
        assert torch.equal(_bits(C2), _bits(C1)) and torch.equal(_bits(n2), _bits(n1)), density


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("v_density", [0.9, 0.03])  # masked contiguous rows vs gathered columns
def test_keep_leaves_other_entries_bit_identical(op, monkeypatch: pytest.MonkeyPatch, isa: str,
                                                 v_density: float) -> None:
    if isa == "scalar":
        monkeypatch.setenv("TERNKIT_ISA", "scalar")
    else:
        monkeypatch.delenv("TERNKIT_ISA", raising=False)
    torch.manual_seed(3)
    B, NH, DK, DV = 2, 2, 40, 256
    C = torch.randn(B, NH, DK, DV)
    special = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan")])
    C.view(-1)[::7] = special.repeat(C.numel() // 28 + 1)[: C.view(-1)[::7].numel()]
    n = torch.randn(B, NH, DK)
    n.view(-1)[::5] = -0.0
    k, v = _ternary((B, NH, DK), 0.3), _ternary((B, NH, DV), v_density)
    v[..., 1] = 0.5  # at least one non-zero column per head
    i, f = torch.rand(B, NH) + 0.5, torch.ones(B, NH)
    outside = ~((k != 0).unsqueeze(-1) & (v != 0).unsqueeze(-2))
    for fn in (stc_write_reference, lambda *a: op(*a)):
        C1, n1 = C.clone(), n.clone()
        fn(C1, n1, k, v, i, f)
        assert torch.equal(_bits(C1)[outside], _bits(C)[outside])
        assert torch.equal(_bits(n1)[k == 0], _bits(n)[k == 0])
        inside = ~outside & torch.isfinite(C)
        assert torch.equal(C1[inside], (C + i[..., None, None] * (k.unsqueeze(-1) * v.unsqueeze(-2)))[inside])
        assert int((_bits(C1) != _bits(C)).sum()) > 0


def test_counts_and_wrapper_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    B, NH, DK, DV = 1, 3, 8, 10
    C, n = torch.randn(B, NH, DK, DV), torch.randn(B, NH, DK)
    k, v = torch.zeros(B, NH, DK), torch.zeros(B, NH, DV)
    k[0, 0, :3], v[0, 0, :4] = 1.0, -2.0  # head 0: 3 x 4, kept
    k[0, 1, :2], v[0, 1, :5] = 0.5, 0.25  # head 1: 2 x 5, decayed
    k[0, 2, :6] = 1.0                     # head 2: 6 x 0, sign flip
    i, f = torch.ones(B, NH), torch.tensor([[1.0, 0.7, -1.0]])
    expected = {"total": 3 * 80, "written": 12 + 10, "decayed": 2 * 80}
    C_d, n_d = _dense(C, n, k, v, i, f)
    results = {}
    for use_compiled in (True, False):
        if not use_compiled:
            monkeypatch.setitem(stc_write_mod._COMPILED.cache, "cpu", False)  # force the twin
        C1, n1 = C.clone(), n.clone()
        results[use_compiled] = stats = stc_write(C1, n1, k, v, i, f)
        assert tuple(stats) == STAT_KEYS and stats == expected
        assert torch.equal(C1, C_d) and torch.equal(n1, n_d)
    assert skip_fraction(results[True]) == pytest.approx(1 - (22 + 160) / 480)


def test_opcheck(op) -> None:
    torch.manual_seed(5)
    for f_value in (1.0, 0.7):
        C, n, k, v, i, f = _case(1, 2, 8, 12, 0.5, f_value)
        torch.library.opcheck(op.default, (C, n, k, v, i, f))


def test_bad_inputs_raise_ternkit_error() -> None:
    C, n, k, v = torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 6)
    i, f = torch.ones(1, 2), torch.ones(1, 2)
    bad = [
        ((C[0], n, k, v, i, f), "C of shape"),
        ((C, n, v, v, i, f), "k of shape"),
        ((C, n, k, k, i, f), "v of shape"),
        ((C, n[..., :3], k, v, i, f), "n of shape"),
        ((C, n, k, v, i[:, :1], f), "i_scale of shape"),
        ((C, n, k, v, i, f.double()), "float32"),
        ((C.half(), n, k, v, i, f), "float32"),
        ((C, n, k.to(torch.int32), v, i, f), "float32"),
        ((C.transpose(2, 3).contiguous().transpose(2, 3), n, k, v, i, f), "contiguous"),
    ]
    for fn in (stc_write, stc_write_reference):
        for args, needle in bad:
            with pytest.raises(TernkitError, match=needle):
                fn(*args)
        with pytest.raises(TernkitError, match="no_grad"):
            fn(C, n, k.clone().requires_grad_(), v, i, f)
    assert torch.count_nonzero(C) == 0 and torch.count_nonzero(n) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_matches_twin() -> None:
    assert compiled_available("cuda"), "ternkit::stc_write has no CUDA kernel; see ternkit.ops.compiled.status()"
    torch.manual_seed(6)
    for shape in [(2, 3, 24, 40), (1, 4, 256, 256), (1, 2, 67, 520)]:
        for density in (*DENSITIES, 0.05):
            for f_value in F_VALUES:
                C, n, k, v, i, f = _case(*shape, density, f_value)
                C1, n1 = C.clone(), n.clone()
                st1 = stc_write_reference(C1, n1, k, v, i, f)
                Cg, ng = C.cuda(), n.cuda()
                st2 = stc_write(Cg, ng, k.cuda(), v.cuda(), i.cuda(), f.cuda())
                assert st2 == st1, (shape, density, f_value)
                assert torch.equal(_bits(Cg.cpu()), _bits(C1)), (shape, density, f_value)
                assert torch.equal(_bits(ng.cpu()), _bits(n1)), (shape, density, f_value)
