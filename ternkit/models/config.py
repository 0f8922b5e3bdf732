"""The model configuration: one typed object from recipe to checkpoint to export.

:class:`ModelConfig` *is* the recipe's ``model:`` section, what :class:`ternkit.models.lm.XLSTMLM`
is built from, and what checkpoints and exports store (``to_dict()``). Allowed values and the
checks between fields live here once. :func:`migrate_model_config` turns the dicts that older
checkpoints and exports stored (flat ``ternary``/``ternary_scale``/``act_bits`` keys and a loose
``moe`` dict) into today's form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from ternkit.errors import TernkitError
from ternkit.ops.mlstm import GATE_MODES
from ternkit.quant.spec import TernarySpec
from ternkit.schema import Section

__all__ = [
    "FFN_KINDS",
    "GATE_MODES",
    "MEMORY_BACKENDS",
    "NORMS",
    "PROJECTIONS",
    "ModelConfig",
    "MoEConfig",
    "XLSTMLMConfig",
    "check_model_fits",
    "migrate_model_config",
    "physical_memory_bytes",
]

Projection = Literal["up", "qkv", "down", "ffn", "head"]
FfnKind = Literal["none", "dense", "ternary", "moe"]
MemoryBackend = Literal["dense", "stc_sparse"]
Norm = Literal["layernorm", "rmsnorm"]
Balancing = Literal["aux_loss", "aux_free"]
GateMode = Literal[GATE_MODES]  # type: ignore[valid-type]  # the modes the mLSTM ops implement

#: Weight groups that may be ternary: "up", "qkv", "down" of the mLSTM layer, "ffn" (the SwiGLU of
#: every FFN block, MoE experts included; an FFN of kind "ternary" is ternary anyway), "head".
PROJECTIONS: tuple[str, ...] = get_args(Projection)
FFN_KINDS: tuple[str, ...] = get_args(FfnKind)
MEMORY_BACKENDS: tuple[str, ...] = get_args(MemoryBackend)
NORMS: tuple[str, ...] = get_args(Norm)
#: Default FFN hidden width over d_model (SwiGLU's 8/3); MoE experts without a width share it out over top_k.
FFN_FACTOR = 2.667


class MoEConfig(Section):
    """Top-k Mixture-of-Experts FFN settings (used by blocks whose ``ffn`` kind is ``"moe"``).

    ``aux_loss_weight`` left unset resolves to 0.01 with ``balancing="aux_loss"`` and 0.0 with
    ``"aux_free"`` (DeepSeek-V3 balances with the bias alone; set a small weight to add its
    complementary loss). ``hidden`` None -> ``ffn_factor * d_model / top_k`` of the model.
    ``capacity_factor`` 0 means dropless. ``jitter`` is the Switch multiplicative noise eps on the
    router input (training only): x * U(1 - eps, 1 + eps). Whether experts are ternary, and how,
    is the model's setting (``"ffn"`` in ``ternary_projections``, ``quant``).
    """

    experts: int = Field(12, ge=1, description="number of routed experts")
    top_k: int = Field(3, ge=1, description="experts each token is sent to")
    hidden: int | None = Field(None, ge=1, description="expert hidden width; None -> ffn_factor * d_model / top_k")
    renormalize: bool = Field(True, description="renormalise the top-k gate weights to sum to 1")
    jitter: float = Field(0.0, ge=0.0, lt=1.0, description="multiplicative router input noise during training")
    aux_loss_weight: float | None = Field(None, ge=0.0, description="Switch load-balance loss weight; None -> 0.01 "
                                                                    "for aux_loss balancing, 0 for aux_free")
    z_loss_weight: float = Field(1e-3, ge=0.0, description="ST-MoE router z-loss weight")
    balancing: Balancing = Field("aux_loss", description="aux loss, or DeepSeek-V3 bias balancing")
    bias_update_rate: float = Field(1e-3, ge=0.0, description="per-step bias update for aux_free balancing")
    capacity_factor: float = Field(0.0, ge=0.0, description="0 = dropless; >0 caps tokens per expert")
    shared_expert: bool = Field(False, description="add one always-on expert")

    _error_prefix: ClassVar[str] = "model.moe."

    @model_validator(mode="before")
    @classmethod
    def _aux_weight_by_balancing(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("aux_loss_weight") is None:
            data = dict(data)
            data["aux_loss_weight"] = 0.0 if data.get("balancing") == "aux_free" else 0.01
        return data

    @model_validator(mode="after")
    def _top_k_fits(self) -> "MoEConfig":
        if self.top_k > self.experts:
            raise ValueError(f"model.moe.top_k ({self.top_k}) must not exceed model.moe.experts ({self.experts})")
        return self

    def hidden_for(self, d_model: int, ffn_factor: float = FFN_FACTOR) -> int:
        """Expert hidden width: ``hidden``, or ``ffn_factor * d_model / top_k`` (same compute as one dense FFN)."""
        return self.hidden if self.hidden is not None else max(1, int(round(ffn_factor * d_model / self.top_k)))



class ModelConfig(Section):
    """The network: an xLSTM/mLSTM block stack with optional ternary projections, STC memory and MoE FFNs.

    ``ternary_projections`` names the weight groups that are ternarized (see ``PROJECTIONS``), or
    ``"all"`` (every group; the head only when it is not tied to the embedding); ``quant`` says how.
    ``ffn`` is one kind for every block or one per block: "none", "dense" (SwiGLU), "ternary"
    (SwiGLU of ternary layers) or "moe". ``vocab_size`` None is filled from the tokenizer or the
    synthetic task before a model is built. ``extra`` is free-form metadata the model ignores.
    """

    arch: Literal["xlstm_lm"] = "xlstm_lm"
    vocab_size: int | None = Field(None, ge=2, description="None -> taken from the tokenizer or synthetic task")
    d_model: int = Field(128, ge=1)
    n_blocks: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    context_length: int = Field(128, ge=2)
    tie_embeddings: bool = True
    proj_factor: float = Field(2.0, gt=0.0, description="mLSTM up-projection factor")
    conv_kernel: int = Field(4, ge=1)
    qkv_blocksize: int = Field(4, ge=1)
    chunk_size: int = Field(64, ge=1, description="chunkwise-parallel mLSTM chunk length")
    gate_mode: GateMode = "sigmoid"
    memory_backend: MemoryBackend = "dense"
    target_sparsity: float = Field(0.75, ge=0.0, lt=1.0, description="fraction of zero trits the STC memory aims at")
    stc_quantize: Literal["kv", "k"] = Field(
        "kv", description="what the STC memory quantizes: keys and values, or keys only (float values; the write "
                          "still skips the zero rows)")
    stc_threshold: Literal["head", "vector"] = Field(
        "head", description="one adaptive zero threshold per head, or one per vector (every key keeps the same "
                            "number of entries)")
    value_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="target zero fraction of STC values; None -> target_sparsity")
    forget_bias_init: tuple[float, float] = Field(
        (3.0, 6.0), description="(start, end) of the forget-gate bias linspace over heads; ~0.5 for a ternary gate to learn")
    gate_soft_cap: float | None = Field(
        None, gt=0.0, description="soft cap c * tanh(x / c) on the input and forget gate pre-activations (xLSTM 7B uses "
        "15): bounds them, which unbounded ternary-gate runs need at 8 blocks and lr 3e-3; None = off")
    ternary_projections: list[Projection] | Literal["all"] = Field(default_factory=lambda: ["up", "qkv", "down", "ffn"])
    quant: TernarySpec = Field(default_factory=TernarySpec, description="how ternary layers are scaled and fed")
    ffn: FfnKind | list[FfnKind] = Field("none", description="one kind for every block, or one per block")
    ffn_factor: float = Field(FFN_FACTOR, gt=0.0)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    norm: Norm = "layernorm"
    norm_eps: float = Field(1e-5, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="free-form metadata; not used by the model")

    _error_prefix: ClassVar[str] = "model."

    @model_validator(mode="before")
    @classmethod
    def _canonical_projections(cls, data: Any) -> Any:
        # One order for one set, so two configs naming the same projections compare (and resume) equal.
        if isinstance(data, dict) and isinstance(data.get("ternary_projections"), (list, tuple)):
            names = list(data["ternary_projections"])
            known = [p for p in PROJECTIONS if p in names]
            data = dict(data)
            data["ternary_projections"] = known + [n for n in names if n not in PROJECTIONS]
        return data

    @model_validator(mode="after")
    def _shapes_fit(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if isinstance(self.ffn, list) and len(self.ffn) != self.n_blocks:
            raise ValueError(
                f"model.ffn lists {len(self.ffn)} kinds but model.n_blocks is {self.n_blocks}; give one per block or a single kind"
            )
        inner = self.inner_dim
        if inner % self.n_heads:
            raise ValueError(f"model inner width {inner} (proj_factor * d_model) does not divide by model.n_heads "
                             f"({self.n_heads}); change n_heads or proj_factor")
        if inner % self.qkv_blocksize:
            raise ValueError(f"model inner width {inner} does not divide by model.qkv_blocksize ({self.qkv_blocksize}); "
                             "change qkv_blocksize or proj_factor")
        if (self.memory_backend == "stc_sparse" and self.stc_threshold == "vector"
                and round(self.target_sparsity * self.head_dim) >= self.head_dim):
            raise ValueError(f"model.target_sparsity {self.target_sparsity} zeroes all {self.head_dim} entries of every "
                             "key with per-vector thresholds; lower it or widen the heads")
        if self.tie_embeddings and isinstance(self.ternary_projections, list) and "head" in self.ternary_projections:
            raise ValueError("a tied LM head cannot be ternary; drop 'head' from model.ternary_projections or set "
                             "model.tie_embeddings false")
        return self

    # --- derived values ----------------------------------------------------------------------------

    @property
    def inner_dim(self) -> int:
        """Width of the mLSTM branch: round(proj_factor * d_model)."""
        return int(round(self.proj_factor * self.d_model))

    @property
    def head_dim(self) -> int:
        """Per-head memory width DH = inner_dim / n_heads."""
        return self.inner_dim // self.n_heads

    @property
    def ternary(self) -> tuple[str, ...]:
        """The ternary weight groups, resolved (``"all"`` expanded, a tied head left out), in ``PROJECTIONS`` order."""
        if self.ternary_projections == "all":
            return tuple(p for p in PROJECTIONS if not (p == "head" and self.tie_embeddings))
        return tuple(self.ternary_projections)

    def is_ternary(self, projection: str) -> bool:
        """Whether the weight group ``projection`` (one of ``PROJECTIONS``) is ternarized."""
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")
        return projection in self.ternary

    def spec_for(self, projection: str) -> TernarySpec | None:
        """The :class:`TernarySpec` of weight group ``projection``, or None where it stays float."""
        return self.quant if self.is_ternary(projection) else None

    def ffn_kinds(self) -> list[str]:
        """The FFN kind of each block, length ``n_blocks``."""
        return list(self.ffn) if isinstance(self.ffn, list) else [self.ffn] * self.n_blocks

    def ffn_hidden(self) -> int:
        """Hidden width of a dense or ternary SwiGLU FFN: round(ffn_factor * d_model)."""
        return max(1, int(round(self.ffn_factor * self.d_model)))

    def estimate_parameters(self, vocab_size: int | None = None) -> int:
        """About how many values a model built from this config holds, computed from the config alone (no tensors).

        ``vocab_size`` stands in for an unset ``self.vocab_size`` (256, the byte tokenizer's, when
        both are None). Counts every weight matrix, gate, norm and conv; leaves out biases, which
        are a rounding error. Python integers, so an absurd config gives an absurd number, not an overflow.
        """
        vocab = self.vocab_size if self.vocab_size is not None else (vocab_size or 256)
        d, inner, nh = self.d_model, self.inner_dim, self.n_heads
        total = vocab * d + d  # embedding, final norm
        if not self.tie_embeddings:
            total += d * vocab
        qkv = 3 * inner * inner if self.is_ternary("qkv") else 3 * inner * self.qkv_blocksize
        mlstm = (d  # pre-norm
                 + d * 2 * inner + inner * self.conv_kernel + inner + qkv  # up-projection, conv, q/k/v
                 + 2 * (3 * inner * nh + nh) + inner + inner  # gates, per-head norm, learnable skip
                 + inner * d)  # down-projection
        # Count blocks by FFN kind rather than listing them: n_blocks may be absurd too.
        per_kind = {self.ffn: self.n_blocks} if isinstance(self.ffn, str) else {k: self.ffn.count(k) for k in set(self.ffn)}
        for kind, blocks in per_kind.items():
            ffn = 0
            if kind in ("dense", "ternary"):
                ffn = d + 3 * d * self.ffn_hidden()
            elif kind == "moe":
                experts = self.moe.experts + (1 if self.moe.shared_expert else 0)
                ffn = d + d * self.moe.experts + experts * 3 * d * self.moe.hidden_for(d, self.ffn_factor)
            total += blocks * (mlstm + ffn)
        return total

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        """This config with ``vocab_size`` filled in when it is unset (a recipe's own value wins)."""
        if self.vocab_size is not None:
            return self
        return self.model_copy(update={"vocab_size": int(vocab_size)})

    # --- serialization -----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The config of a model to build, from a stored dict (today's or an older format); needs ``vocab_size``."""
        d = migrate_model_config(d)
        if d.get("vocab_size") is None:
            raise TernkitError("model config is missing the required key 'vocab_size'; add it.")
        return super().from_dict(d)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(s))


def physical_memory_bytes() -> int | None:
    """The memory this process may use, in bytes: physical RAM, or a smaller cgroup (container) limit; None if unknown."""
    try:
        total: int | None = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        total = None
    # A container's limit is what the kernel enforces (the OOM killer), however much RAM the host has.
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or 0 < int(text) < total):
            total = int(text)
    return total


_UNITS = ("B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_bytes(n: int | float) -> str:
    """``n`` bytes in decimal units, e.g. ``"1.3 EB"``, ``"128 GB"``."""
    value = float(n)
    for unit in _UNITS:
        if value < 1000 or unit == _UNITS[-1]:
            return f"{value:.2g} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def short_count(n: int) -> str:
    """A count in short scientific form: ``3.2e17``, ``4.5e6``; small counts as they are."""
    if n < 100_000:
        return f"{n:,}"
    mantissa, exponent = f"{float(n):.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


#: Bytes per parameter: fp32 weights only, and training with each optimizer on the CPU
#: (weights + gradients + the optimizer's state: AdamW keeps two moments, Muon one momentum).
BYTES_FP32 = 4
TRAIN_BYTES = {"adamw": 16, "muon": 12}


def check_model_fits(cfg: ModelConfig, vocab_size: int | None = None, bytes_per_param: int = BYTES_FP32,
                     purpose: str = "", fix: str = "lower model.d_model or model.n_blocks") -> int:
    """The estimated parameter count of ``cfg``; TernkitError when ``bytes_per_param`` times it exceeds this machine's memory.

    Called before a model is allocated, so that an absurd size (``model.d_model=100000000``) is
    one sentence with the numbers instead of minutes of swapping and the OOM killer.
    ``purpose`` (e.g. ``"to train with adamw"``) labels the extra figure when ``bytes_per_param``
    is more than fp32 weights alone; ``fix`` ends the sentence.
    """
    n = cfg.estimate_parameters(vocab_size)
    memory = physical_memory_bytes()
    if memory is None or n * bytes_per_param <= memory:
        return n
    vocab = cfg.vocab_size if cfg.vocab_size is not None else (vocab_size or 256)
    keys = [f"model.d_model={cfg.d_model}", f"model.n_blocks={cfg.n_blocks}"]
    if "moe" in (cfg.ffn if isinstance(cfg.ffn, list) else [cfg.ffn]):
        keys.append(f"model.moe.experts={cfg.moe.experts}")
    keys.append(f"a vocabulary of {vocab}")
    extra = f", about {human_bytes(n * bytes_per_param)} {purpose}" if bytes_per_param != BYTES_FP32 and purpose else ""
    raise TernkitError(f"{', '.join(keys[:-1])} and {keys[-1]} give about {short_count(n)} parameters "
                       f"({human_bytes(n * BYTES_FP32)} in fp32{extra}), more than this machine's "
                       f"{human_bytes(memory)} of memory; {fix}.")


#: The name older code and checkpoints use for the model config.
XLSTMLMConfig = ModelConfig

# Fields of the format before the config was unified, with that format's defaults where today's differ.
_OLD_DEFAULTS = {"n_blocks": 2, "context_length": 256, "tie_embeddings": False}
_OLD_TERNARY_KEYS = ("ternary", "ternary_scale", "ternary_group_size", "act_bits")


def migrate_model_config(d: dict[str, Any]) -> dict[str, Any]:
    """Today's :class:`ModelConfig` dict from a stored one; a dict in today's form comes back as a copy.

    The older form (written by ternkit 0.1 checkpoints and exports) kept the ternary setting as
    flat ``ternary`` (list of projections), ``ternary_scale``, ``ternary_group_size`` and
    ``act_bits`` keys, repeated them inside a ``moe`` dict (or ``moe: null``), and had other
    defaults for ``n_blocks``, ``context_length`` and ``tie_embeddings``.
    """
    if not isinstance(d, dict):
        raise TernkitError(f"model config must be a mapping of field names to values, got {type(d).__name__}.")
    out = json.loads(json.dumps(d))  # a deep, JSON-clean copy: the caller's dict stays untouched
    if "ternary_projections" in out or not any(k in out for k in _OLD_TERNARY_KEYS + ("moe",)):
        return out
    for key, value in _OLD_DEFAULTS.items():
        out.setdefault(key, value)
    ternary = out.pop("ternary", None) or []
    if isinstance(ternary, dict):
        ternary = [k for k, on in ternary.items() if on]
    elif isinstance(ternary, str):
        ternary = [ternary]
    ternary = list(ternary)
    quant = {"scale": out.pop("ternary_scale", "absmean"), "group_size": out.pop("ternary_group_size", 32),
             "act_bits": out.pop("act_bits", None)}
    moe = out.pop("moe", None)
    kinds = out.get("ffn", "none")
    kinds = list(kinds) if isinstance(kinds, (list, tuple)) else [kinds]
    if isinstance(moe, dict):
        moe = dict(moe)
        moe.setdefault("hidden", 256)  # the old MoE dataclass's default, not today's ffn_factor-derived width
        experts_ternary = bool(moe.pop("ternary", True))
        expert_quant = {"scale": moe.pop("ternary_scale", "absmean"), "group_size": moe.pop("ternary_group_size", 32),
                        "act_bits": moe.pop("act_bits", None)}
        if "moe" in kinds:
            cannot = ("this model config's MoE experts and {} differ in how they are ternary, which the current format "
                      "cannot express (one quant setting for the model); retrain it with ternkit's current recipe format.")
            if experts_ternary != ("ffn" in ternary):
                if "dense" in kinds:  # "ffn" also decides the dense FFNs
                    raise TernkitError(cannot.format("dense FFNs"))
                ternary = ternary + ["ffn"] if experts_ternary else [p for p in ternary if p != "ffn"]
            if experts_ternary and expert_quant != quant:
                raise TernkitError(cannot.format("the other ternary layers"))
        out["moe"] = moe
    out["ternary_projections"] = ternary
    out["quant"] = quant
    return out
