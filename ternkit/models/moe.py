"""Top-k Mixture-of-Experts FFN with ternary SwiGLU experts, a float router and dropless sort-by-expert dispatch.

The block follows the open implementations (Switch, ST-MoE, Mixtral, OLMoE, DeepSeek-V3) with
their known pitfalls fixed:

- the Switch load-balancing loss is normalized by ``k`` so a perfectly balanced router gives
  exactly 1.0 for any ``top_k`` (Hugging Face's version leaves a factor ``k``);
- padding tokens (``mask`` False) take no part in routing counts, the balance loss, the z-loss,
  the statistics or the capacity; their FFN output is zero, so they pass through the residual;
- dispatch sorts the ``T * k`` routed slots by expert once and runs one contiguous matmul per
  expert slice, with a single host synchronisation per forward (the per-expert counts);
  an expert that receives no tokens is skipped and its weights simply get no gradient.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ternkit.errors import TernkitError
from ternkit.models.config import MoEConfig
from ternkit.models.ffn import SwiGLU
from ternkit.quant.spec import TernarySpec

__all__ = ["MoEConfig", "SwiGLUExpert", "MoEFFN", "update_moe_biases", "moe_modules"]

# Experts are ternary AbsMean layers unless a caller says otherwise (the model passes its own spec).
_DEFAULT_SPEC = TernarySpec()


def SwiGLUExpert(d_model: int, hidden: int, spec: TernarySpec | None = _DEFAULT_SPEC) -> SwiGLU:
    """One expert: the model's SwiGLU with W1 and W3 apart (a ternary scale each) and the layers' own init."""
    return SwiGLU(d_model, hidden, spec, n_blocks=None, fused=False)


class MoEFFN(nn.Module):
    """Top-k MoE FFN: y (B, S, D) from x (B, S, D) and an optional padding mask (B, S) bool (True = real token).

    Router (float, fp32 math): logits = x W_r, probs = softmax(logits), top-k of probs (plus the
    balancing bias with ``balancing="aux_free"``), gate weights = the chosen probs, renormalized to sum
    1 when ``cfg.renormalize``. Each forward sets ``aux_loss`` and ``z_loss`` (unweighted scalars; the
    caller multiplies by ``cfg.aux_loss_weight`` / ``cfg.z_loss_weight``) and ``last_stats``.

    Jitter (training only) multiplies the router's input, not the experts' (Switch; HF Mixtral jitters
    both). Padding tokens still pass through the router matmul (cheap) but are routed to no expert.

    Aux-loss-free balancing (DeepSeek-V3) keeps a persistent bias ``expert_bias`` (E,) added to the
    routing scores for the top-k choice only. DeepSeek-V3 scores with a sigmoid; here the scores are the
    softmax probabilities, which keeps one router for both modes (the sign update does not care).
    Call :meth:`update_bias` (or :func:`update_moe_biases`) once per optimizer step.

    With ``capacity_factor > 0`` each expert keeps at most ceil(cf * T * k / E) slots (T = real
    tokens). Priority is deterministic: first choices before second choices (GShard / ST-MoE),
    then token order; dropped slots contribute zero, so the token keeps only its residual (and
    its other experts).
    """

    #: Float buffers the training loop keeps equal across DDP ranks (the bias update all-reduces the loads).
    SYNCED_BUFFERS: ClassVar[tuple[str, ...]] = ("expert_bias",)

    def __init__(self, d_model: int, cfg: MoEConfig, spec: TernarySpec | None = _DEFAULT_SPEC,
                 hidden: int | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.spec = spec
        self.hidden = hidden if hidden is not None else cfg.hidden_for(d_model)
        self.router = nn.Linear(d_model, cfg.experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = nn.ModuleList(SwiGLUExpert(d_model, self.hidden, spec) for _ in range(cfg.experts))
        self.shared = SwiGLUExpert(d_model, self.hidden, spec) if cfg.shared_expert else None
        self.register_buffer("expert_bias", torch.zeros(cfg.experts, dtype=torch.float32), persistent=True)
        # Loads since the last bias update, summed over micro-batches; transient, so not checkpointed.
        self.register_buffer("load_accum", torch.zeros(cfg.experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.z_loss: torch.Tensor = torch.zeros(())
        self._stats: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route x (T, D) -> (topk_idx (T, k) long, gate (T, k) fp32, logits (T, E) fp32, probs (T, E) fp32)."""
        xr = x.float()
        if self.training and self.cfg.jitter > 0:
            eps = self.cfg.jitter
            xr = xr * torch.empty_like(xr).uniform_(1.0 - eps, 1.0 + eps)
        logits = F.linear(xr, self.router.weight.float())
        probs = torch.softmax(logits, dim=-1)
        if self.cfg.balancing == "aux_free":
            sel = probs.detach() + self.expert_bias.to(probs.dtype)
            topk_idx = torch.topk(sel, self.cfg.top_k, dim=-1).indices
            gate = probs.gather(-1, topk_idx)
        else:
            gate, topk_idx = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.renormalize:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return topk_idx, gate, logits, probs

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """y (B, S, D) from x (B, S, D); ``mask`` (B, S) bool marks real tokens (False = padding, output 0)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise TernkitError(f"MoEFFN expects x of shape (B, S, {self.d_model}), got {tuple(x.shape)}.")
        B, S, D = x.shape
        E, k = self.cfg.experts, self.cfg.top_k
        T = B * S
        xf = x.reshape(T, D)
        valid = self._valid(mask, B, S, x.device)

        topk_idx, gate, logits, probs = self.route(xf)
        # Padding slots get the sentinel expert id E: they sort past every real slice and are never
        # computed, which avoids a nonzero() (host sync) to select the real tokens.
        if valid is not None:
            topk_idx_m = topk_idx.masked_fill(~valid[:, None], E)
        else:
            topk_idx_m = topk_idx
        # k-major flattening: all first choices (token order), then all second choices, ... so the
        # stable sort puts higher-priority slots first inside each expert slice (capacity drops the tail).
        flat_exp = topk_idx_m.t().reshape(-1)
        flat_tok = torch.arange(T, device=x.device).repeat(k)
        flat_gate = gate.t().reshape(-1)
        order = torch.argsort(flat_exp, stable=True)
        counts = torch.bincount(flat_exp, minlength=E + 1)[:E]
        counts_host = counts.tolist()  # the one host sync of the forward

        n_real_slots = sum(counts_host)
        n_tok = n_real_slots // k
        cap = self._capacity(n_tok)
        segments: list[tuple[int, int, int]] = []  # (expert, start in sorted order, kept length)
        start = 0
        kept_total = 0
        for e, c in enumerate(counts_host):
            n = c if cap is None else min(c, cap)
            if n > 0:
                segments.append((e, start, n))
            kept_total += n
            start += c
        dropped = n_real_slots - kept_total

        if dropped > 0:
            keep_pos = torch.cat([torch.arange(s, s + n) for _, s, n in segments]).to(x.device)
            sel = order[keep_pos]
        else:
            sel = order[:n_real_slots]
        sel_tok = flat_tok[sel]
        sel_gate = flat_gate[sel].to(x.dtype)[:, None]
        xs = torch.index_select(xf, 0, sel_tok)
        out = xf.new_zeros(T, D)
        no_grad = not torch.is_grad_enabled()
        sizes = [n for _, _, n in segments]
        # split, not slicing: a slice's backward materialises a zero tensor the size of the whole input.
        parts = zip(segments, xs.split(sizes), sel_gate.split(sizes), sel_tok.split(sizes))
        for (e, _, _), x_e, g_e, tok_e in parts:
            y = self.experts[e](x_e)
            # In-place gate scaling is safe only without autograd (mul's backward needs y).
            y = y.mul_(g_e) if no_grad else y * g_e
            out.index_add_(0, tok_e, y.to(out.dtype))
        if self.shared is not None:
            sh = self.shared(xf)
            out = out + (sh if valid is None else sh * valid[:, None].to(sh.dtype))

        self._losses_and_stats(logits, probs, counts, counts_host, valid, n_tok, dropped, n_real_slots)
        return out.reshape(B, S, D)

    def forward_dense(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """y (B, S, D) by running every expert on every token and weighting by the (dropless) gate.

        Same router and experts as :meth:`forward`; the baseline the MoE dispatch is measured against.
        Sets no losses or stats.
        """
        B, S, D = x.shape
        T = B * S
        xf = x.reshape(T, D)
        valid = self._valid(mask, B, S, x.device)
        topk_idx, gate, _, _ = self.route(xf)
        if valid is not None:
            gate = gate * valid[:, None].to(gate.dtype)
        dense_gate = gate.new_zeros(T, self.cfg.experts).scatter(1, topk_idx, gate).to(x.dtype)
        out = xf.new_zeros(T, D)
        for e, expert in enumerate(self.experts):
            out.addcmul_(expert(xf).to(out.dtype), dense_gate[:, e:e + 1])
        if self.shared is not None:
            sh = self.shared(xf)
            out = out + (sh if valid is None else sh * valid[:, None].to(sh.dtype))
        return out.reshape(B, S, D)

    # ---------------------------------------------------------------------------------- helpers
    def _valid(self, mask: torch.Tensor | None, B: int, S: int, device: torch.device) -> torch.Tensor | None:
        if mask is None:
            return None
        if tuple(mask.shape) != (B, S):
            raise TernkitError(f"MoEFFN mask must have shape (B, S) = ({B}, {S}), got {tuple(mask.shape)}.")
        return mask.reshape(B * S).to(device=device, dtype=torch.bool)

    def _capacity(self, n_tok: int) -> int | None:
        if self.cfg.capacity_factor <= 0:
            return None
        return math.ceil(self.cfg.capacity_factor * n_tok * self.cfg.top_k / self.cfg.experts)

    def _losses_and_stats(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
                          counts_host: list[int], valid: torch.Tensor | None, n_tok: int, dropped: int,
                          n_slots: int) -> None:
        E, k = self.cfg.experts, self.cfg.top_k
        if n_tok == 0:
            zero = logits.sum() * 0.0  # keeps the graph connected; no real token, no loss
            self.aux_loss, self.z_loss = zero, zero
            ent = torch.zeros((), device=logits.device)
        else:
            w = None if valid is None else valid.to(probs.dtype)
            # f_i = routed slots of expert i / (k T); P_i = mean prob; E * sum f_i P_i = 1 when balanced.
            f = counts.to(probs.dtype) / (k * n_tok)
            p_sum = probs.sum(0) if w is None else (probs * w[:, None]).sum(0)
            P = p_sum / n_tok
            self.aux_loss = E * torch.sum(f * P)
            lse2 = torch.logsumexp(logits, dim=-1).square()
            self.z_loss = (lse2.sum() if w is None else (lse2 * w).sum()) / n_tok
            with torch.no_grad():
                h = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
                ent = (h.sum() if w is None else (h * w).sum()) / n_tok
        if self.training and self.cfg.balancing == "aux_free":
            with torch.no_grad():
                self.load_accum += counts.to(self.load_accum.dtype)
        # Floats are produced lazily in ``last_stats`` so forward needs no extra host sync.
        self._stats = {
            "tokens_per_expert": counts_host,
            "aux_loss": self.aux_loss.detach(),
            "z_loss": self.z_loss.detach(),
            "router_entropy": ent,
            "dropped_frac": dropped / n_slots if n_slots else 0.0,
        }

    @property
    def last_stats(self) -> dict[str, Any]:
        """Statistics of the last forward: tokens_per_expert (list[int], routed slots before capacity
        drops), load_imbalance (max / mean of those; 0.0 with no tokens), aux_loss, z_loss,
        router_entropy (mean per-token entropy of probs, nats), dropped_frac (dropped / routed slots)."""
        if not self._stats:
            return {}
        tpe = list(self._stats["tokens_per_expert"])
        mean = sum(tpe) / len(tpe)
        return {
            "tokens_per_expert": tpe,
            "load_imbalance": (max(tpe) / mean) if mean > 0 else 0.0,
            "aux_loss": float(self._stats["aux_loss"]),
            "z_loss": float(self._stats["z_loss"]),
            "router_entropy": float(self._stats["router_entropy"]),
            "dropped_frac": float(self._stats["dropped_frac"]),
        }

    # ------------------------------------------------------------------------- bias balancing
    @torch.no_grad()
    def update_bias(self) -> bool:
        """Apply b_i += gamma * sign(mean_load - load_i) with the loads accumulated since the last call.

        Loads are summed over DDP ranks first (all_reduce SUM when torch.distributed is initialized),
        so every replica keeps the same bias; every rank must call this at the same step. Only training
        forwards count; counting a forward twice (activation recomputation) scales every load alike,
        which leaves sign(mean - load) unchanged. Returns
        False (and does nothing) unless ``balancing == "aux_free"``.
        """
        if self.cfg.balancing != "aux_free":
            return False
        load = self.load_accum.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, op=torch.distributed.ReduceOp.SUM)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()
        return True

    def freeze(self) -> MoEFFN:
        """Switch to eval mode and cache every expert's ternarized weights (inference fast path)."""
        self.eval()
        for m in self.modules():
            if isinstance(m, SwiGLU):
                m.freeze()
        return self

    def unfreeze(self) -> MoEFFN:
        """Drop the cached expert weights."""
        for m in self.modules():
            if isinstance(m, SwiGLU):
                m.unfreeze()
        return self

    def extra_repr(self) -> str:
        c = self.cfg
        tern = "float" if self.spec is None else f"{self.spec.scale}, act_bits={self.spec.act_bits}"
        return (f"d_model={self.d_model}, experts={c.experts}, top_k={c.top_k}, hidden={self.hidden}, "
                f"balancing={c.balancing}, capacity_factor={c.capacity_factor}, spec={tern}")


def moe_modules(model: nn.Module) -> list[tuple[str, MoEFFN]]:
    """(name, block) of every :class:`MoEFFN` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFFN)]


def update_moe_biases(model: nn.Module) -> int:
    """Call :meth:`MoEFFN.update_bias` on every MoE block of ``model``; returns how many were updated."""
    return sum(int(m.update_bias()) for _, m in moe_modules(model))
