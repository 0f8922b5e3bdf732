"""xLSTM language model: embedding, (mLSTM [+ FFN]) blocks with pre-norm residuals, final norm, LM head."""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ternkit.errors import TernkitError
from ternkit.models.config import ModelConfig
from ternkit.models.ffn import SwiGLU, has_latent_weight, small_init_
from ternkit.models.mlstm import MLSTMLayer, MLSTMState
from ternkit.modules.linear import make_linear

__all__ = ["SwiGLU", "XLSTMBlock", "XLSTMLM", "LMState"]

# Decoding state of the whole model: one MLSTMState per block.
LMState = list[MLSTMState]


def _make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=False)


class XLSTMBlock(nn.Module):
    """x (B, S, D) -> x + mLSTM(norm(x)) -> (+ FFN(norm(.)) when the block has one)."""

    def __init__(self, cfg: ModelConfig, ffn_kind: str) -> None:
        super().__init__()
        self.ffn_kind = ffn_kind
        self.norm = _make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlstm = MLSTMLayer(cfg)
        self.ffn_norm: nn.Module | None = None
        self.ffn: nn.Module | None = None
        if ffn_kind == "none":
            return
        self.ffn_norm = _make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        if ffn_kind == "moe":
            from ternkit.models.moe import MoEFFN

            self.ffn = MoEFFN(cfg.d_model, cfg.moe, cfg.spec_for("ffn"),
                              hidden=cfg.moe.hidden_for(cfg.d_model, cfg.ffn_factor))
        else:
            spec = cfg.quant if ffn_kind == "ternary" else cfg.spec_for("ffn")
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden(), spec, n_blocks=cfg.n_blocks)
        self.ffn_dropout = nn.Dropout(cfg.dropout)

    def _ffn(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.ffn is None or self.ffn_norm is None:
            return x
        h = self.ffn_norm(x)
        y = self.ffn(h, mask) if self.ffn_kind == "moe" else self.ffn(h)
        return x + self.ffn_dropout(y)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """y (B, S, D) from x (B, S, D); ``mask`` (B, S) bool (True = real token) only reaches a MoE FFN."""
        x = x + self.mlstm(self.norm(x))
        return self._ffn(x, mask)

    def prefill(self, x: torch.Tensor, state: MLSTMState | None = None) -> tuple[torch.Tensor, MLSTMState]:
        """(y (B, S, D), state) from x (B, S, D), optionally continuing ``state``."""
        y, st = self.mlstm.prefill(self.norm(x), state)
        return self._ffn(x + y, None), st

    def step(self, x_t: torch.Tensor, state: MLSTMState | None) -> tuple[torch.Tensor, MLSTMState]:
        """(y_t (B, D), state) from one token's x_t (B, D)."""
        y, st = self.mlstm.step(self.norm(x_t), state)
        return self._ffn((x_t + y).unsqueeze(1), None)[:, 0], st


class XLSTMLM(nn.Module):
    """xLSTM language model: logits (B, S, V) from tokens (B, S) long; stateful prefill/step decoding.

    Blocks are pre-norm residual (mLSTM, then the optional FFN of ``cfg.ffn``); the head is tied to
    the embedding with ``tie_embeddings`` and ternary only when ``"head"`` is in ``cfg.ternary``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise TernkitError("model.vocab_size is not set; build the model from a config with a vocabulary size "
                               "(ModelConfig.with_vocab(n)).")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        small_init_(self.embedding.weight, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(XLSTMBlock(cfg, kind) for kind in cfg.ffn_kinds())
        self.norm = _make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.head: nn.Module | None = None
        else:
            self.head = make_linear(cfg.d_model, cfg.vocab_size, cfg.spec_for("head"))
            if has_latent_weight(self.head):
                small_init_(self.head.weight, cfg.d_model)

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig | dict[str, Any]) -> XLSTMLM:
        """Build a model from a ModelConfig or its stored dict form (see :meth:`ModelConfig.from_dict`)."""
        if isinstance(cfg, dict):
            cfg = ModelConfig.from_dict(cfg)
        return cls(cfg)

    @property
    def config(self) -> ModelConfig:
        """The model's configuration."""
        return self.cfg

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Number of trainable parameters (the tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embedding.weight.numel()
        return n

    # --- forward -------------------------------------------------------------------------------------

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.head is None:
            return F.linear(x, self.embedding.weight.to(x.dtype))
        return self.head(x)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TernkitError(f"tokens must be an integer tensor, got {tokens.dtype}; pass token ids (torch.long).")
        return self.emb_dropout(self.embedding(tokens))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, S, V) from tokens (B, S) long; ``mask`` (B, S) bool marks real tokens (MoE routing only)."""
        if tokens.dim() != 2:
            raise TernkitError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}; add a batch dimension.")
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self._logits(x)

    def prefill(self, tokens: torch.Tensor, state: LMState | None = None) -> tuple[torch.Tensor, LMState]:
        """(logits (B, S, V), state) from tokens (B, S); continues ``state`` when given (chunkwise form)."""
        x = self._embed(tokens)
        new_state: LMState = []
        for j, block in enumerate(self.blocks):
            x, st = block.prefill(x, None if state is None else state[j])
            new_state.append(st)
        return self._logits(x), new_state

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> LMState:
        """Zero decoding state for ``batch_size`` sequences (one dict per block)."""
        return [b.mlstm.init_state(batch_size, device=device, dtype=dtype) for b in self.blocks]

    def step(self, token: torch.Tensor, state: LMState | None = None) -> tuple[torch.Tensor, LMState]:
        """(logits (B, V), state) after one token (B,) long; state None starts from zeros. Constant memory per token."""
        x = self._embed(token.view(-1))
        new_state: LMState = []
        for j, block in enumerate(self.blocks):
            x, st = block.step(x, None if state is None else state[j])
            new_state.append(st)
        return self._logits(x), new_state

    def stream(self, tokens: torch.Tensor, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield each decoded token (B,) long, one at a time, after the prompt tokens (B, S) (prefill, then step).

        The first token is yielded right after the prefill, every later one after one recurrent
        step, so a caller can print tokens as they come and time prefill and decode apart. The
        model is not stepped past the last yielded token. :meth:`generate` is this stream,
        concatenated.
        """
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.shape[1] == 0:
            raise TernkitError("generate needs a prompt of at least one token; pass a non-empty prompt.")
        if not greedy and temperature <= 0:
            raise TernkitError(f"temperature must be > 0 for sampling, got {temperature}; use greedy=True instead.")
        return self._stream(tokens, max_new_tokens, greedy, temperature, top_k, generator)

    @torch.no_grad()
    def _stream(self, tokens: torch.Tensor, max_new_tokens: int, greedy: bool, temperature: float,
                top_k: int | None, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        # A separate generator function so that stream() checks its arguments when called, not on first next().
        logits, state = self.prefill(tokens)
        last = logits[:, -1]
        for i in range(max_new_tokens):
            if greedy:
                nxt = last.argmax(-1)
            else:
                scaled = last.float() / temperature
                if top_k is not None:
                    kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]
            yield nxt
            if i + 1 < max_new_tokens:
                last, state = self.step(nxt, state)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """tokens (B, S + max_new_tokens): the prompt (B, S) followed by decoded tokens (prefill, then step)."""
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        out = [tokens] + [t.unsqueeze(1) for t in self.stream(tokens, max_new_tokens, greedy, temperature, top_k,
                                                              generator)]
        return torch.cat(out, dim=1)

    # --- losses and statistics -----------------------------------------------------------------------

    def moe_blocks(self) -> list[tuple[int, nn.Module]]:
        """(block index, MoEFFN) of every MoE block."""
        return [(j, b.ffn) for j, b in enumerate(self.blocks) if b.ffn_kind == "moe" and b.ffn is not None]

    def aux_loss(self) -> torch.Tensor:
        """Scalar: sum over MoE blocks of aux_loss_weight * aux + z_loss_weight * z from the last forward (0 if none)."""
        total = self.embedding.weight.new_zeros(())
        for _, moe in self.moe_blocks():
            c = moe.cfg
            total = total + float(c.aux_loss_weight) * moe.aux_loss.to(total) + float(c.z_loss_weight) * moe.z_loss.to(total)
        return total

    def moe_stats(self) -> list[dict[str, Any]]:
        """Per MoE block: its index and the MoE's last_stats (tokens_per_expert, load_imbalance, ...)."""
        return [{"block": j, **moe.last_stats} for j, moe in self.moe_blocks()]

    def stc_stats(self) -> list[dict[str, Any]]:
        """Per STC block: its index, tau per head of k and v, last zero fractions and the decode skip fraction."""
        return [{"block": j, **b.mlstm.stc_stats()} for j, b in enumerate(self.blocks) if b.mlstm.k_quant is not None]

    def sync_stc_(self) -> None:
        """All-reduce (mean) every STC threshold across ranks; call after optimizer steps under DDP."""
        for b in self.blocks:
            for quant in (b.mlstm.k_quant, b.mlstm.v_quant):
                if quant is not None:
                    quant.sync_()

    def reset_skip_stats(self) -> None:
        """Forget the sparse-write counts of every block (start a new decoding measurement)."""
        for b in self.blocks:
            b.mlstm.reset_skip_stats()

    def skip_fraction(self) -> float:
        """Fraction of sparse-write work skipped in decoding, pooled over all STC layers (nan if none)."""
        from ternkit.ops.stc_write import skip_fraction

        pooled: dict[str, Any] = {}
        for b in self.blocks:
            for key, val in b.mlstm.skip_stats.items():
                pooled[key] = pooled.get(key, 0) + val
        return float(skip_fraction(pooled)) if pooled else float("nan")
