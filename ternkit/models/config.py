"""The model configuration: one typed object from recipe to checkpoint to export.

:class:`ModelConfig` *is* the recipe's ``model:`` section, what :class:`ternkit.models.lm.XLSTMLM`
is built from, and what checkpoints and exports store (``to_dict()``). Allowed values and the
checks between fields live here once. :func:`migrate_model_config` turns the dicts that older
checkpoints and exports stored (flat ``ternary``/``ternary_scale``/``act_bits`` keys and a loose
``moe`` dict) into today's form.
"""

from __future__ import annotations

import json
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
    "migrate_model_config",
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
