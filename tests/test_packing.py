"""Packing formats: exact round trips, hand-checked bytes, bits per weight, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ternkit.errors import TernkitError
from ternkit.quant.packing import (
    BLOCK_2BIT,
    PackingError,
    base3_nbytes,
    bits_per_weight,
    pack_2bit,
    pack_base3,
    pack_trits,
    packed_2bit_width,
    unpack_2bit,
    unpack_base3,
    unpack_trits,
)


def _rand_trits(shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g, dtype=torch.int8).to(device)


# 1-D .. 3-D; the last dim spans 1..300 (crossing multiples of 4, 5 and 128), leading dims stay
# small so one example is a few thousand trits at most.
_shapes = st.one_of(
    st.tuples(st.integers(1, 300)),
    st.tuples(st.integers(1, 6), st.integers(1, 300)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 300)),
)


# Shapes at the edges of both formats' padding (5 trits per byte, 128-trit 2-bit blocks).
_EDGE_SHAPES = ((1,), (127,), (128,), (129,), (2, 256), (3, 2, 257), (7, 5))


def _roundtrip_cases(fn):  # type: ignore[no-untyped-def]
    """80 hypothesis shapes plus the padding edge cases, for a test taking (shape, seed)."""
    for seed, shape in enumerate(_EDGE_SHAPES):
        fn = example(shape=shape, seed=seed)(fn)
    return settings(max_examples=80, deadline=None)(given(shape=_shapes, seed=st.integers(0, 2**31 - 1))(fn))


@_roundtrip_cases
def test_base3_roundtrip_exact(shape: tuple[int, ...], seed: int) -> None:
    t = _rand_trits(shape, seed)
    packed = pack_base3(t)
    assert packed.dtype == torch.uint8
    assert packed.shape == (base3_nbytes(t.numel()),)
    assert int(packed.max()) <= 242
    out = unpack_base3(packed, shape)
    assert out.dtype == torch.int8
    assert torch.equal(out, t)


@_roundtrip_cases
def test_2bit_roundtrip_exact(shape: tuple[int, ...], seed: int) -> None:
    t = _rand_trits(shape, seed)
    packed = pack_2bit(t)
    k = shape[-1]
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], -(-k // 128) * 32)
    out = unpack_2bit(packed, k)
    assert out.dtype == torch.int8
    assert torch.equal(out, t)


@settings(max_examples=40, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(["base3", "2bit"]))
def test_generic_roundtrip_exact(shape: tuple[int, ...], seed: int, fmt: str) -> None:
    t = _rand_trits(shape, seed)
    packed, meta = pack_trits(t, fmt)
    assert meta["format"] == fmt
    assert meta["shape"] == list(shape)
    assert meta["bits_per_weight"] == pytest.approx(8 * packed.numel() / t.numel())
    assert torch.equal(unpack_trits(packed, fmt, meta["shape"]), t)


def test_base3_hand_checked_codes() -> None:
    # codes 0,1,2,2,0 -> 0*1 + 1*3 + 2*9 + 2*27 + 0*81
    assert pack_base3(torch.tensor([-1, 0, 1, 1, -1], dtype=torch.int8)).tolist() == [75]
    assert pack_base3(torch.tensor([1, 1, 1, 1, 1], dtype=torch.int8)).tolist() == [242]
    assert pack_base3(torch.tensor([-1, -1, -1, -1, -1], dtype=torch.int8)).tolist() == [0]
    # 7 trits -> 2 bytes; the tail pads with code 0: second byte = 2*1 + 1*3 = 5
    t = torch.tensor([0, 0, 0, 0, 0, 1, 0], dtype=torch.int8)
    assert pack_base3(t).tolist() == [1 + 3 + 9 + 27 + 81, 5]
    assert unpack_base3(torch.tensor([75], dtype=torch.uint8), (5,)).tolist() == [-1, 0, 1, 1, -1]


def test_2bit_layout_hand_built() -> None:
    k = 130  # two blocks, the second holding 2 real trits and 126 padding trits
    t = torch.zeros(k, dtype=torch.int8)
    t[0], t[32], t[64], t[96] = 1, -1, 0, 1  # all four lanes of byte 0
    t[5] = -1  # byte 5, bits 0-1
    t[32 + 7] = 1  # byte 7, bits 2-3
    t[128], t[129] = -1, 1  # block 1, bytes 0 and 1, bits 0-1
    packed = pack_2bit(t)
    assert packed.shape == (64,)
    expect = [0b01010101] * 64  # code 1 (trit 0) in every lane
    expect[0] = 2 | (0 << 2) | (1 << 4) | (2 << 6)  # = 146
    expect[5] = 0 | (1 << 2) | (1 << 4) | (1 << 6)  # = 84
    expect[7] = 1 | (2 << 2) | (1 << 4) | (1 << 6)  # = 89
    expect[32] = 0 | (1 << 2) | (1 << 4) | (1 << 6)  # = 84
    expect[33] = 2 | (1 << 2) | (1 << 4) | (1 << 6)  # = 86
    assert packed.tolist() == expect
    assert expect[0] == 146 and expect[7] == 89


def test_2bit_shift_gives_contiguous_runs() -> None:
    """The SIMD property: (block >> 2s) & 3 over 32 contiguous bytes is trits 32s..32s+31 of that block."""
    t = _rand_trits((3, 300), seed=11)
    packed = pack_2bit(t)
    padded = torch.zeros(3, 384, dtype=torch.int8)
    padded[:, :300] = t
    for b in range(3):
        block = packed[:, 32 * b : 32 * b + 32]
        for s in range(4):
            run = ((block >> (2 * s)) & 3).to(torch.int8) - 1
            assert torch.equal(run, padded[:, 128 * b + 32 * s : 128 * b + 32 * s + 32])


def test_2bit_rows_are_independent() -> None:
    t = _rand_trits((4, 200), seed=3)
    packed = pack_2bit(t)
    for i in range(4):
        assert torch.equal(packed[i], pack_2bit(t[i]))


def test_bits_per_weight() -> None:
    assert bits_per_weight("base3", (4000, 5000)) == pytest.approx(1.6)
    assert bits_per_weight("base3", (5,)) == pytest.approx(1.6)
    assert bits_per_weight("base3", (6,)) == pytest.approx(16 / 6)
    assert bits_per_weight("2bit", (64, 4096)) == pytest.approx(2.0)
    assert bits_per_weight("2bit", (10, 130)) == pytest.approx(8 * 64 / 130)
    assert bits_per_weight("2bit", (3,)) == pytest.approx(8 * 32 / 3)
    assert packed_2bit_width(128) == 32 and packed_2bit_width(129) == 64 and BLOCK_2BIT == 128


def test_accepts_float_and_noncontiguous_trits() -> None:
    t = _rand_trits((40, 50), seed=9)
    tt = t.t()  # non-contiguous
    assert torch.equal(unpack_2bit(pack_2bit(tt.float()), 40), tt)
    assert torch.equal(unpack_base3(pack_base3(tt.float()), (50, 40)), tt)


def test_errors() -> None:
    bad = torch.tensor([0, 2, -1], dtype=torch.int8)
    with pytest.raises(TernkitError, match="other than -1, 0 and \\+1"):
        pack_2bit(bad)
    with pytest.raises(TernkitError, match="other than"):
        pack_trits(torch.tensor([0.5, 0.0]), "base3")
    with pytest.raises(TernkitError, match="unknown packing format 'int4'"):
        pack_trits(torch.zeros(3, dtype=torch.int8), "int4")
    with pytest.raises(TernkitError, match="K=129 needs 64"):
        unpack_2bit(torch.zeros(2, 32, dtype=torch.uint8), 129)
    with pytest.raises(ValueError, match="fewer than the 3"):  # PackingError stays a ValueError
        unpack_base3(torch.zeros(2, dtype=torch.uint8), (11,))
    with pytest.raises(PackingError, match="no trits"):
        bits_per_weight("2bit", (0, 5))
    packed, _ = pack_trits(torch.zeros(2, 10, dtype=torch.int8), "2bit")
    with pytest.raises(PackingError, match="not \\(3, 10\\)"):
        unpack_trits(packed, "2bit", (3, 10))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["base3", "2bit"])
def test_cuda_matches_cpu(fmt: str) -> None:
    t = _rand_trits((3, 17, 301), seed=21)
    packed_cpu, meta = pack_trits(t, fmt)
    packed_gpu, _ = pack_trits(t.cuda(), fmt)
    assert packed_gpu.is_cuda
    assert torch.equal(packed_gpu.cpu(), packed_cpu)
    out = unpack_trits(packed_gpu, fmt, meta["shape"])
    assert out.is_cuda
    assert torch.equal(out.cpu(), t)
