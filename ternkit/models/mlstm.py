"""The mLSTM layer of xLSTM (up-projection, causal conv, block-diagonal q/k/v, gated matrix memory, down-projection)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ternkit.models.config import ModelConfig
from ternkit.models.ffn import has_latent_weight, small_init_, wang_init_
from ternkit.ops import mlstm as mlstm_ops
from ternkit.modules.linear import make_linear
from ternkit.modules.stc import STCQuantizer

__all__ = ["BlockDiagonalLinear", "CausalConv1d", "MLSTMLayer", "MLSTMState", "MultiHeadLayerNorm"]

# Decoding keeps the stabilizer where the decay put it until an input gate exceeds it by this many
# nats (see mlstm_recurrent_step): the decay factor is then exactly 1 on most steps and the sparse
# write skips its pass over C; training uses the exact max (slack 0). exp(10) = 2.2e4 keeps every
# input scale far inside fp32.
DECODE_STABILIZER_SLACK = 10.0

# Per-layer decoding state: the memory (C (B, NH, DH, DH), n (B, NH, DH), m (B, NH)) and the conv
# buffer (B, conv_kernel - 1, inner) holding the last inputs of the q/k path. Its size does not grow with tokens.
MLSTMState = dict[str, torch.Tensor]


class BlockDiagonalLinear(nn.Module):
    """Headwise linear y (..., D) = blockdiag(W_1..W_NB) x (..., D), blocks (NB, bs, bs); xLSTM's LinearHeadwiseExpand."""

    def __init__(self, dim: int, blocksize: int, bias: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.blocksize = blocksize
        self.num_blocks = dim // blocksize
        self.weight = nn.Parameter(torch.empty(self.num_blocks, blocksize, blocksize))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        small_init_(self.weight, blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., D) from x (..., D)."""
        xs = x.reshape(*x.shape[:-1], self.num_blocks, self.blocksize)
        y = torch.einsum("...hd,hod->...ho", xs, self.weight.to(x.dtype)).reshape(x.shape)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, blocksize={self.blocksize}, bias={self.bias is not None}"


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time: y (B, S, D) from x (B, S, D); y_t sees x_{t-K+1..t}."""

    def __init__(self, dim: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, padding=kernel_size - 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (B, S, D), causal."""
        s = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :s].transpose(1, 2)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The conv buffer after reading x (B, S, D): its last K-1 inputs (B, K-1, D), zero-padded on the left."""
        k1 = self.kernel_size - 1
        if k1 == 0:
            return x.new_zeros(x.shape[0], 0, x.shape[2])
        return F.pad(x, (0, 0, k1, 0))[:, -k1:]

    def step(self, x_t: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: y_t (B, D) from x_t (B, D) and the buffer (B, K-1, D); returns (y_t, new buffer)."""
        window = torch.cat([buf, x_t.unsqueeze(1)], dim=1)  # (B, K, D), oldest first
        w = self.conv.weight[:, 0, :].t().to(x_t.dtype)  # (K, D); w[K-1] multiplies the newest input
        y = (window * w.unsqueeze(0)).sum(1)
        if self.conv.bias is not None:
            y = y + self.conv.bias.to(x_t.dtype)
        return y, window[:, 1:]


class MultiHeadLayerNorm(nn.Module):
    """Per-head layer norm with a weight and no bias: y (B, NH, S, DH) normalized over DH; xLSTM's group norm."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Normalized h, same shape (B, NH, ..., DH); the weight is laid out head-major (NH * DH,)."""
        y = F.layer_norm(h.float(), (self.head_dim,), eps=self.eps).to(h.dtype)
        shape = (1, self.num_heads) + (1,) * (h.dim() - 3) + (self.head_dim,)
        return y * self.weight.view(shape).to(h.dtype)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"


class MLSTMLayer(nn.Module):
    """mLSTM layer y (B, S, D) = layer(x (B, S, D)) as in xLSTM, with optional ternary projections and STC memory.

    x -> up-projection to (x_m, z), each ``inner`` wide; q, k = blockdiag(SiLU(causalconv(x_m)));
    v = blockdiag(x_m); input/forget gate pre-activations = Linear(cat(q, k, v)) per head; with
    ``memory_backend="stc_sparse"`` k (and v, with ``stc_quantize="kv"``) are quantized
    (STCQuantizer: one threshold per head or per vector, ``stc_threshold``) before the memory op,
    so every form (parallel, chunkwise, recurrent step) sees the same k and v.
    h = mLSTM(q, k, v, i, f) -> per-head layer norm -> + skip * SiLU(conv) -> * SiLU(z) -> down-projection.

    Ternary choice for "qkv": the float layer uses block-diagonal 4x4 blocks (xLSTM); a ternary
    "qkv" uses three full-width TernaryLinear (inner -> inner) instead, so that q/k/v pack and run
    on the same ternary kernels as every other projection (a 4x4 ternary block has only 16 trits
    and one absmean scale per tensor would fit it badly).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, inner, nh = cfg.d_model, cfg.inner_dim, cfg.n_heads
        self.inner_dim = inner
        self.num_heads = nh
        self.head_dim = cfg.head_dim
        self.proj_up = make_linear(d, 2 * inner, cfg.spec_for("up"), bias=cfg.bias)
        self.conv = CausalConv1d(inner, cfg.conv_kernel)
        qkv = cfg.spec_for("qkv")
        if qkv is not None:
            self.q_proj = make_linear(inner, inner, qkv, bias=cfg.bias)
            self.k_proj = make_linear(inner, inner, qkv, bias=cfg.bias)
            self.v_proj = make_linear(inner, inner, qkv, bias=cfg.bias)
        else:
            self.q_proj = BlockDiagonalLinear(inner, cfg.qkv_blocksize, bias=cfg.bias)
            self.k_proj = BlockDiagonalLinear(inner, cfg.qkv_blocksize, bias=cfg.bias)
            self.v_proj = BlockDiagonalLinear(inner, cfg.qkv_blocksize, bias=cfg.bias)
        self.igate = nn.Linear(3 * inner, nh, bias=True)
        self.fgate = nn.Linear(3 * inner, nh, bias=True)
        self.outnorm = MultiHeadLayerNorm(nh, self.head_dim, eps=cfg.norm_eps)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = make_linear(inner, d, cfg.spec_for("down"), bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.k_quant: STCQuantizer | None = None
        self.v_quant: STCQuantizer | None = None
        if cfg.memory_backend == "stc_sparse":
            self.k_quant = STCQuantizer(nh, cfg.target_sparsity, threshold=cfg.stc_threshold)
            if cfg.stc_quantize == "kv":
                v_sparsity = cfg.target_sparsity if cfg.value_sparsity is None else cfg.value_sparsity
                self.v_quant = STCQuantizer(nh, v_sparsity, threshold=cfg.stc_threshold)
        # Decoding statistics of the sparse write (accumulated by step()).
        self.skip_stats: dict[str, Any] = {}
        # Decoding with an STC memory uses the sparse write; False forces the dense write (benchmarks' baseline).
        self.sparse_decode = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xLSTM's initialization: small init in, Wang init out, zero gate weights, forget bias linspace."""
        cfg = self.cfg
        if has_latent_weight(self.proj_up):
            small_init_(self.proj_up.weight, cfg.d_model)
        if has_latent_weight(self.proj_down):
            wang_init_(self.proj_down.weight, self.inner_dim, cfg.n_blocks)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            if isinstance(proj, BlockDiagonalLinear):
                small_init_(proj.weight, cfg.qkv_blocksize)
            elif has_latent_weight(proj):
                small_init_(proj.weight, self.inner_dim)
        for proj in (self.proj_up, self.proj_down, self.q_proj, self.k_proj, self.v_proj):
            b = getattr(proj, "bias", None)
            if isinstance(b, nn.Parameter):
                nn.init.zeros_(b)
            alpha = getattr(proj, "alpha", None)
            if isinstance(alpha, nn.Parameter) and has_latent_weight(proj):
                with torch.no_grad():  # LSQ scale follows the re-initialized latent weight
                    alpha.copy_(2.0 * proj.weight.abs().mean())
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            start, end = cfg.forget_bias_init
            self.fgate.bias.copy_(torch.linspace(start, end, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.ones_(self.learnable_skip)
        nn.init.ones_(self.outnorm.weight)

    # --- shared pieces -------------------------------------------------------------------------

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, S, inner) -> (B, NH, S, DH)
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def _qkv_gates(self, x_m: torch.Tensor, x_c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, NH, S, DH) and gate pre-activations i, f (B, NH, S) from x_m and the conv output (B, S, inner)."""
        q = self.q_proj(x_c)
        k = self.k_proj(x_c)
        v = self.v_proj(x_m)
        qkv = torch.cat([q, k, v], dim=-1)
        i = self.igate(qkv).transpose(1, 2)
        f = self.fgate(qkv).transpose(1, 2)
        cap = self.cfg.gate_soft_cap
        if cap is not None:
            # Before the memory op, so every form (parallel, chunkwise, step) sees the same capped gates.
            i, f = cap * torch.tanh(i / cap), cap * torch.tanh(f / cap)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.k_quant is not None:
            k = self.k_quant(k)
        if self.v_quant is not None:
            v = self.v_quant(v)
        return q, k, v, i, f

    def _output(self, h: torch.Tensor, x_c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y (B, S, D) from h (B, NH, S, DH), the conv activation and z (B, S, inner)."""
        b, _, s, _ = h.shape
        h = self.outnorm(h).transpose(1, 2).reshape(b, s, self.inner_dim)
        h = (h + self.learnable_skip.to(h.dtype) * x_c) * F.silu(z)
        return self.dropout(self.proj_down(h))

    def _front(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_m, z = self.proj_up(x).chunk(2, dim=-1)
        x_c = F.silu(self.conv(x_m))
        return x_m, x_c, z

    # --- the three entry points ----------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (B, S, D) from x (B, S, D): parallel form for S <= chunk_size, chunkwise otherwise."""
        x_m, x_c, z = self._front(x)
        q, k, v, i, f = self._qkv_gates(x_m, x_c)
        mode = self.cfg.gate_mode
        if x.shape[1] <= self.cfg.chunk_size:
            h = mlstm_ops.mlstm_parallel(q, k, v, i, f, gate_mode=mode)
        else:
            h = mlstm_ops.mlstm_chunkwise(q, k, v, i, f, gate_mode=mode, chunk_size=self.cfg.chunk_size)
        return self._output(h, x_c, z)

    def prefill(self, x: torch.Tensor, state: MLSTMState | None = None) -> tuple[torch.Tensor, MLSTMState]:
        """(y (B, S, D), state) from x (B, S, D), optionally continuing ``state``; chunkwise form."""
        if state is not None:
            # Continue the conv across the boundary: the buffer is the left context of this piece.
            buf = state["conv"]
            x_m, z = self.proj_up(x).chunk(2, dim=-1)
            full = torch.cat([buf.to(x_m.dtype), x_m], dim=1)
            x_c = F.silu(self.conv(full))[:, buf.shape[1]:]
            init = (state["C"], state["n"], state["m"])
            conv_tail = self.conv.tail(full)
        else:
            x_m, x_c, z = self._front(x)
            init = None
            conv_tail = self.conv.tail(x_m)
        q, k, v, i, f = self._qkv_gates(x_m, x_c)
        h, (c, n, m) = mlstm_ops.mlstm_chunkwise(q, k, v, i, f, gate_mode=self.cfg.gate_mode,
                                                  chunk_size=self.cfg.chunk_size, initial_state=init,
                                                  return_final_state=True)
        return self._output(h, x_c, z), {"C": c, "n": n, "m": m, "conv": conv_tail}

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> MLSTMState:
        """A zero state for ``batch_size`` sequences: C (B, NH, DH, DH), n (B, NH, DH), m (B, NH), conv (B, K-1, inner)."""
        nh, dh = self.num_heads, self.head_dim
        return {
            "C": torch.zeros(batch_size, nh, dh, dh, device=device, dtype=dtype),
            "n": torch.zeros(batch_size, nh, dh, device=device, dtype=dtype),
            "m": torch.zeros(batch_size, nh, device=device, dtype=dtype),
            "conv": torch.zeros(batch_size, self.conv.kernel_size - 1, self.inner_dim, device=device, dtype=dtype),
        }

    def step(self, x_t: torch.Tensor, state: MLSTMState | None = None) -> tuple[torch.Tensor, MLSTMState]:
        """One token: (y_t (B, D), state) from x_t (B, D) and the previous state (None = zeros); constant memory.

        With ``memory_backend="stc_sparse"`` and autograd off (``torch.no_grad()``, as in decoding)
        the memory write uses the sparse path (only the nnz(k) x nnz(v) entries are touched, the
        decay pass is skipped when it is the identity; same numbers as the dense write) and its
        counts accumulate in :attr:`skip_stats`; see :meth:`skip_fraction`. With autograd off (either
        backend) the write updates the fp32 C and n of ``state`` in place (the returned state holds
        the same tensors), so pass each state to ``step`` once. With autograd on, the dense write
        runs on the same quantized k and v and returns new tensors.
        """
        b = x_t.shape[0]
        if state is None:
            state = self.init_state(b, device=x_t.device, dtype=x_t.dtype)
        x_m, z = self.proj_up(x_t).chunk(2, dim=-1)
        x_c, conv_buf = self.conv.step(x_m, state["conv"].to(x_m.dtype))
        x_c = F.silu(x_c)
        # Reuse the sequence path with S = 1 so the step applies exactly the same projections and quantizers.
        q, k, v, i, f = self._qkv_gates(x_m.unsqueeze(1), x_c.unsqueeze(1))
        q, k, v, i, f = q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0]
        mem = (state["C"], state["n"], state["m"])
        decoding = not torch.is_grad_enabled()
        if self.k_quant is not None and self.sparse_decode and decoding:
            h, (c, n, m) = _sparse_step(q, k, v, i, f, mem, self.cfg.gate_mode, self.skip_stats)
        else:
            h, (c, n, m) = mlstm_ops.mlstm_recurrent_step(q, k, v, i, f, state=mem, gate_mode=self.cfg.gate_mode,
                                                          inplace=decoding,
                                                          stabilizer_slack=DECODE_STABILIZER_SLACK if decoding else 0.0)
        y = self._output(h.unsqueeze(2), x_c.unsqueeze(1), z.unsqueeze(1))[:, 0]
        return y, {"C": c, "n": n, "m": m, "conv": conv_buf}

    # --- STC statistics --------------------------------------------------------------------------

    def skip_fraction(self) -> float:
        """Fraction of the memory-update work skipped by the sparse write since the last reset (nan if none)."""
        return _skip_fraction(self.skip_stats)

    def reset_skip_stats(self) -> None:
        """Forget the accumulated sparse-write counts."""
        self.skip_stats.clear()

    def stc_stats(self) -> dict[str, Any]:
        """Threshold kind, tau per head (None with per-vector thresholds or float values), last zero fractions of the
        k and v quantizers, and the decode skip fraction (empty if dense)."""
        if self.k_quant is None:
            return {}
        v = self.v_quant
        per_head = self.k_quant.threshold == "head"  # per-vector thresholds keep no tau
        return {
            "threshold": self.k_quant.threshold,
            "tau_k": self.k_quant.tau.tolist() if per_head else None,
            "tau_v": v.tau.tolist() if v is not None and per_head else None,
            "zero_fraction_k": self.k_quant.last_zero_fraction,
            "zero_fraction_v": v.last_zero_fraction if v is not None else None,
            "skip_fraction": self.skip_fraction(),
        }


def _sparse_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                 mem: tuple[torch.Tensor, torch.Tensor, torch.Tensor], gate_mode: str,
                 stats: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Recurrent step with the STC sparse write, accumulating its skip counts into ``stats``."""
    return mlstm_ops.mlstm_recurrent_step(q, k, v, i, f, state=mem, gate_mode=gate_mode,
                                          sparse_write=True, stats=stats, inplace=True,
                                          stabilizer_slack=DECODE_STABILIZER_SLACK)


def _skip_fraction(stats: dict[str, Any]) -> float:
    from ternkit.ops.stc_write import skip_fraction

    if not stats:
        return float("nan")
    return float(skip_fraction(stats))
