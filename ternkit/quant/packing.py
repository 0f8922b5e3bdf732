"""Packing formats for trits: base-3 (5 trits per byte, 1.6 bits) and 2-bit (4 trits per byte).

Codes: -1 -> 0, 0 -> 1, +1 -> 2 in both formats.

base-3 ("base3")
    The tensor is flattened; byte ``b`` holds flat trits ``5*b .. 5*b+4``, trit ``j`` of the
    byte carrying weight ``3**j`` (so ``byte = c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4 <= 242``).
    The tail is padded with code 0. Densest byte-aligned format (1.6 bits per trit), but a
    kernel must divide (or look up a 256-entry table) to get a trit out.

2-bit ("2bit"), the TQ2_0 / bitnet.cpp I2_S style layout
    Packed per row along the last dim ``K``. Each row is padded with trit 0 (code 1) to a
    multiple of :data:`BLOCK_2BIT` = 128 trits, and every 128-trit block becomes 32 bytes::

        byte j of a block (j = 0..31), bits:   7 6 | 5 4 | 3 2 | 1 0
                                     trit:  j+96 | j+64| j+32|  j

    So one block is one 32-byte AVX2 register, and ``(v >> 2*s) & 3`` for ``s = 0..3`` yields
    four *contiguous* runs of 32 trits (``32*s .. 32*s+31``) ready to meet 32 contiguous
    activations -- no shuffles. A row of ``K`` trits takes ``ceil(K/128)*32`` bytes. The padding
    is trit 0 so that a kernel may run over whole blocks and the padded lanes add nothing
    (as long as the padded activations are finite).

The block size is fixed rather than a parameter because kernels are written against it.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch

from ternkit.errors import TernkitError

__all__ = [
    "BLOCK_2BIT",
    "FORMATS",
    "PackingError",
    "base3_nbytes",
    "bits_per_weight",
    "pack_2bit",
    "pack_base3",
    "pack_trits",
    "packed_2bit_width",
    "unpack_2bit",
    "unpack_base3",
    "unpack_trits",
]

BLOCK_2BIT = 128
"""Trits per 2-bit block (32 bytes, one AVX2 register)."""

_BYTES_PER_BLOCK = BLOCK_2BIT // 4
FORMATS = ("base3", "2bit")
_POW3 = (1, 3, 9, 27, 81)
_BASE3_LUT: dict[torch.device, torch.Tensor] = {}


class PackingError(TernkitError, ValueError):
    """Packed data or trits that do not fit the requested format (also a ``ValueError``)."""


def _base3_lut(device: torch.device) -> torch.Tensor:
    """int8 (256, 5) table: row ``b`` holds the five trits of byte ``b``.

    Bytes 243..255 never come out of :func:`pack_base3`; their rows use the same
    ``(b // 3**j) % 3`` rule so every byte decodes deterministically.
    """
    lut = _BASE3_LUT.get(device)
    if lut is None:
        w = torch.tensor(_POW3, dtype=torch.int16)
        lut = ((torch.arange(256, dtype=torch.int16).unsqueeze(1) // w) % 3 - 1).to(torch.int8)
        lut = lut.to(device)
        _BASE3_LUT[device] = lut
    return lut


def _codes(trits: torch.Tensor) -> torch.Tensor:
    """uint8 codes (trit + 1) of a trit tensor, same shape; int8 arithmetic wraps like the format does."""
    return (trits.to(torch.int8) + 1).view(torch.uint8)


def _check_trits(trits: torch.Tensor) -> None:
    """Raise PackingError unless every element of ``trits`` is -1, 0 or +1."""
    if trits.numel() == 0:
        return
    if trits.is_floating_point() or trits.is_complex():
        ok = bool(((trits == -1) | (trits == 0) | (trits == 1)).all())
    elif trits.dtype == torch.bool:
        ok = True
    else:
        ok = int(trits.min()) >= -1 and int(trits.max()) <= 1
    if not ok:
        raise PackingError(
            "trits to pack hold values other than -1, 0 and +1; ternarize the weights first "
            "(e.g. clamp(round(w / alpha), -1, 1))."
        )


def base3_nbytes(numel: int) -> int:
    """Bytes needed to hold ``numel`` trits in base-3 (5 per byte)."""
    return -(-numel // 5)


def pack_base3(trits: torch.Tensor) -> torch.Tensor:
    """Pack a trit tensor of any shape (values in {-1, 0, +1}) into uint8 (ceil(numel/5),), 5 trits per byte.

    Trit ``j`` of byte ``b`` is flat element ``5*b + j`` and carries weight ``3**j``; the tail is
    padded with code 0 (trit -1), which :func:`unpack_base3` drops by shape.
    """
    flat = _codes(trits.reshape(-1))
    pad = (-flat.numel()) % 5
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(-1, 5)
    # Horner form in uint8: every partial sum is <= 242, so nothing overflows.
    return (((g[:, 4] * 3 + g[:, 3]) * 3 + g[:, 2]) * 3 + g[:, 1]) * 3 + g[:, 0]


def unpack_base3(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Unpack uint8 (nbytes,) base-3 bytes into an int8 trit tensor of ``shape``."""
    numel = prod(shape)
    if packed.numel() < base3_nbytes(numel):
        raise PackingError(
            f"packed holds {packed.numel()} bytes, fewer than the {base3_nbytes(numel)} needed for shape "
            f"{tuple(shape)}; pass the shape the trits were packed from."
        )
    p = packed.reshape(-1)[: base3_nbytes(numel)].to(torch.long)
    trits = _base3_lut(p.device).index_select(0, p)  # (nbytes, 5)
    return trits.reshape(-1)[:numel].reshape(tuple(shape))


def packed_2bit_width(k: int) -> int:
    """Bytes per row of ``k`` trits in the 2-bit format: ``ceil(k/128) * 32``."""
    return -(-k // BLOCK_2BIT) * _BYTES_PER_BLOCK


def pack_2bit(trits: torch.Tensor) -> torch.Tensor:
    """Pack int trits (..., K) into uint8 (..., ceil(K/128)*32), TQ2_0-style blocks along the last dim.

    See the module docstring for the byte layout. Rows are padded with trit 0.
    """
    if trits.dim() == 0:
        raise PackingError("pack_2bit packs along the last dim and got a 0-d tensor; reshape it to (1,) first.")
    _check_trits(trits)
    *lead, k = trits.shape
    nblk = -(-k // BLOCK_2BIT)
    codes = torch.ones((*lead, nblk * BLOCK_2BIT), dtype=torch.uint8, device=trits.device)
    codes[..., :k] = _codes(trits)
    c = codes.view(*lead, nblk, 4, _BYTES_PER_BLOCK)
    out = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
    return out.reshape(*lead, nblk * _BYTES_PER_BLOCK)


def unpack_2bit(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unpack uint8 (..., ceil(K/128)*32) 2-bit blocks into int8 trits (..., K)."""
    if packed.dtype != torch.uint8:
        raise PackingError(f"2-bit packed weights must be uint8, got {packed.dtype}; load the tensor as written by pack_2bit.")
    if packed.dim() == 0 or packed.shape[-1] != packed_2bit_width(k):
        width = "a 0-d tensor" if packed.dim() == 0 else f"{packed.shape[-1]} bytes per row"
        raise PackingError(
            f"2-bit packed data has {width} but K={k} needs {packed_2bit_width(k)}; pass the K the row was packed from."
        )
    *lead, nbytes = packed.shape
    nblk = nbytes // _BYTES_PER_BLOCK
    p = packed.reshape(*lead, nblk, 1, _BYTES_PER_BLOCK)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1)
    codes = (p >> shifts) & 3  # (..., nblk, 4, 32): four contiguous runs of 32 trits per block
    trits = codes.reshape(*lead, nblk * BLOCK_2BIT)[..., :k].view(torch.int8) - 1
    return trits


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise PackingError(f"unknown packing format {fmt!r}; use one of {', '.join(FORMATS)}.")


def pack_trits(trits: torch.Tensor, fmt: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pack a trit tensor by format name; returns (uint8 packed, meta) with meta = {format, shape, ...}.

    ``base3`` gives a flat (ceil(numel/5),) tensor; ``2bit`` gives (..., ceil(K/128)*32) and adds
    ``block`` to meta. ``meta["shape"]`` (a list of ints) is what :func:`unpack_trits` needs.
    """
    _check_fmt(fmt)
    _check_trits(trits)
    shape = list(trits.shape)
    meta: dict[str, Any] = {"format": fmt, "shape": shape}
    if fmt == "base3":
        packed = pack_base3(trits)
    else:
        packed = pack_2bit(trits)
        meta["block"] = BLOCK_2BIT
    meta["bits_per_weight"] = bits_per_weight(fmt, shape) if trits.numel() else 0.0
    return packed, meta


def unpack_trits(packed: torch.Tensor, fmt: str, shape: tuple[int, ...] | list[int] | torch.Size) -> torch.Tensor:
    """Unpack uint8 data written by :func:`pack_trits` into int8 trits of ``shape``."""
    _check_fmt(fmt)
    shape = tuple(int(s) for s in shape)
    if fmt == "base3":
        return unpack_base3(packed, shape)
    if not shape:
        raise PackingError("2-bit trits need a shape with at least one dim; pass meta['shape'] from pack_trits.")
    out = unpack_2bit(packed, shape[-1])
    if tuple(out.shape) != shape:
        raise PackingError(
            f"2-bit packed data unpacks to {tuple(out.shape)}, not {shape}; pass meta['shape'] from pack_trits."
        )
    return out


def bits_per_weight(fmt: str, shape: tuple[int, ...] | list[int] | torch.Size) -> float:
    """Stored bits per trit for a tensor of ``shape`` in ``fmt``, padding included (base3 -> 1.6, 2bit -> 2.0 at best)."""
    _check_fmt(fmt)
    shape = tuple(int(s) for s in shape)
    numel = prod(shape)
    if numel == 0:
        raise PackingError(f"shape {shape} holds no trits, so bits per weight is undefined; pass a non-empty shape.")
    if fmt == "base3":
        nbytes = base3_nbytes(numel)
    else:
        if not shape:
            raise PackingError("2-bit format needs a shape with at least one dim; pass the (..., K) shape.")
        nbytes = prod(shape[:-1]) * packed_2bit_width(shape[-1])
    return 8.0 * nbytes / numel
