"""Model configurations as dataclasses: the mLSTM layer and the xLSTM language model (JSON round-trip)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ternkit.errors import TernkitError

__all__ = [
    "FFN_KINDS",
    "GATE_MODES",
    "MEMORY_BACKENDS",
    "NORMS",
    "TERNARY_PROJECTIONS",
    "MLSTMLayerConfig",
    "XLSTMLMConfig",
]

GATE_MODES: tuple[str, ...] = ("sigmoid", "ternary")
MEMORY_BACKENDS: tuple[str, ...] = ("dense", "stc_sparse")
FFN_KINDS: tuple[str, ...] = ("none", "dense", "ternary", "moe")
NORMS: tuple[str, ...] = ("layernorm", "rmsnorm")
# Projections that may be TernaryLinear; "up", "qkv", "down" live in the mLSTM layer, "ffn" is the
# SwiGLU of a "ternary" FFN block (implied by ffn="ternary"; listing it makes every dense FFN ternary), "head" the LM head.
TERNARY_PROJECTIONS: tuple[str, ...] = ("up", "qkv", "down", "ffn", "head")
_LAYER_PROJECTIONS: tuple[str, ...] = ("up", "qkv", "down")
_SCALES: tuple[str, ...] = ("absmean", "per_row", "lsq", "group")


def _normalize_ternary(value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Tuple of projection names from a list/tuple of names, a {name: bool} dict, a bool or None."""
    if value is None or value is False:
        return ()
    if value is True:
        return tuple(allowed)
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        value = [k for k, on in value.items() if on]
    names = tuple(value)
    for name in names:
        if name not in allowed:
            raise TernkitError(f"unknown ternary projection {name!r}; use names from {', '.join(allowed)}.")
    # Keep a canonical order so two configs naming the same set compare equal.
    return tuple(n for n in allowed if n in names)


def _check_choice(what: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TernkitError(f"{what} {value!r} is not supported; use one of {', '.join(allowed)}.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class _DictMixin:
    """from_dict / to_dict for flat dataclasses; unknown keys raise TernkitError naming the key."""

    _name: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict of every field (tuples become lists)."""
        return {f.name: _jsonable(copy.deepcopy(getattr(self, f.name))) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Build the config from a dict such as :meth:`to_dict` returns; unknown keys raise TernkitError."""
        if not isinstance(d, dict):
            raise TernkitError(f"{cls._name} must be a mapping of field names to values, got {type(d).__name__}.")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        for key in d:
            if key not in names:
                raise TernkitError(f"unknown {cls._name} key {key!r}; remove it or use one of {', '.join(sorted(names))}.")
        required = [f.name for f in fields(cls)  # type: ignore[arg-type]
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for key in required:
            if key not in d:
                raise TernkitError(f"{cls._name} is missing the required key {key!r}; add it.")
        return cls(**copy.deepcopy(d))

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Any:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(s))


@dataclass
class MLSTMLayerConfig(_DictMixin):
    """One mLSTM layer (xLSTM's mLSTMLayer): width, heads, projections, gate mode and memory backend.

    ``inner = round(proj_factor * d_model)`` must divide by ``n_heads`` (memory heads) and by
    ``qkv_blocksize`` (block-diagonal q/k/v). ``ternary`` names the projections built as
    TernaryLinear among "up", "qkv", "down"; gates and norms stay float. ``ternary_group_size``
    is the number of weights per scale, used only with ``ternary_scale="group"``.
    ``forget_bias_init`` is the (start, end) of the forget-gate bias linspace over heads.
    """

    _name: ClassVar[str] = "mLSTM layer config"

    d_model: int
    n_heads: int = 4
    proj_factor: float = 2.0
    conv_kernel: int = 4
    qkv_blocksize: int = 4
    chunk_size: int = 64
    gate_mode: str = "sigmoid"
    memory_backend: str = "dense"
    target_sparsity: float = 0.75
    ternary: tuple[str, ...] = ()
    ternary_scale: str = "absmean"
    ternary_group_size: int = 32
    act_bits: int | None = None
    bias: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    forget_bias_init: tuple[float, float] = (3.0, 6.0)
    n_blocks: int = 1  # only used to scale the down-projection init (Wang init), as in xLSTM

    def __post_init__(self) -> None:
        self.ternary = _normalize_ternary(self.ternary, _LAYER_PROJECTIONS)
        self.forget_bias_init = tuple(float(v) for v in self.forget_bias_init)  # type: ignore[assignment]
        if len(self.forget_bias_init) != 2:
            raise TernkitError("forget_bias_init must be two numbers (start, end); e.g. [3.0, 6.0].")
        _check_choice("gate_mode", self.gate_mode, GATE_MODES)
        _check_choice("memory_backend", self.memory_backend, MEMORY_BACKENDS)
        _check_choice("ternary_scale", self.ternary_scale, _SCALES)
        if int(self.ternary_group_size) < 1:
            raise TernkitError(f"ternary_group_size must be a positive integer, got {self.ternary_group_size!r}; e.g. 32.")
        if self.act_bits not in (None, 8):
            raise TernkitError(f"act_bits must be null or 8, got {self.act_bits!r}.")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise TernkitError(f"target_sparsity must be in [0, 1), got {self.target_sparsity!r}.")
        for name in ("d_model", "n_heads", "conv_kernel", "qkv_blocksize", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise TernkitError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        inner = self.inner_dim
        if inner % self.n_heads:
            raise TernkitError(f"inner width {inner} (proj_factor * d_model) does not divide by n_heads={self.n_heads}; "
                               "change n_heads or proj_factor.")
        if inner % self.qkv_blocksize:
            raise TernkitError(f"inner width {inner} does not divide by qkv_blocksize={self.qkv_blocksize}; "
                               "change qkv_blocksize or proj_factor.")

    @property
    def inner_dim(self) -> int:
        """Width of the mLSTM branch: round(proj_factor * d_model)."""
        return int(round(self.proj_factor * self.d_model))

    @property
    def head_dim(self) -> int:
        """Per-head memory width DH = inner_dim / n_heads."""
        return self.inner_dim // self.n_heads


@dataclass
class XLSTMLMConfig(_DictMixin):
    """An xLSTM language model: embedding, ``n_blocks`` (mLSTM [+ FFN]) blocks, final norm, LM head.

    ``ffn`` is one kind for every block or a list with one kind per block, each of "none", "dense"
    (SwiGLU), "ternary" (SwiGLU of TernaryLinear) or "moe" (``moe`` holds the MoEConfig fields).
    ``ternary`` names the TernaryLinear projections among "up", "qkv", "down", "ffn", "head";
    a dict {name: bool} or a list is accepted and stored as a tuple. ``ternary_group_size`` is the
    number of weights per scale of every TernaryLinear, used only with ``ternary_scale="group"``.
    """

    _name: ClassVar[str] = "model config"

    vocab_size: int
    d_model: int = 128
    n_blocks: int = 2
    n_heads: int = 4
    context_length: int = 256
    proj_factor: float = 2.0
    conv_kernel: int = 4
    qkv_blocksize: int = 4
    chunk_size: int = 64
    gate_mode: str = "sigmoid"
    memory_backend: str = "dense"
    target_sparsity: float = 0.75
    ternary: tuple[str, ...] = ()
    ternary_scale: str = "absmean"
    ternary_group_size: int = 32
    act_bits: int | None = None
    ffn: str | tuple[str, ...] = "none"
    ffn_factor: float = 2.667
    moe: dict[str, Any] | None = None
    tie_embeddings: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    bias: bool = False
    forget_bias_init: tuple[float, float] = (3.0, 6.0)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (e.g. tokenizer name); not used by the model

    def __post_init__(self) -> None:
        self.ternary = _normalize_ternary(self.ternary, TERNARY_PROJECTIONS)
        self.forget_bias_init = tuple(float(v) for v in self.forget_bias_init)  # type: ignore[assignment]
        if isinstance(self.ffn, (list, tuple)):
            self.ffn = tuple(self.ffn)
            if len(self.ffn) != self.n_blocks:
                raise TernkitError(f"ffn lists {len(self.ffn)} kinds but n_blocks is {self.n_blocks}; "
                                   "give one kind per block or a single string.")
            for kind in self.ffn:
                _check_choice("ffn kind", kind, FFN_KINDS)
        else:
            _check_choice("ffn kind", self.ffn, FFN_KINDS)
        _check_choice("norm", self.norm, NORMS)
        if self.vocab_size < 1:
            raise TernkitError(f"vocab_size must be a positive integer, got {self.vocab_size!r}.")
        if self.n_blocks < 1:
            raise TernkitError(f"n_blocks must be a positive integer, got {self.n_blocks!r}.")
        if "moe" in self.ffn_kinds() and self.moe is None:
            self.moe = {}
        if self.moe is not None and not isinstance(self.moe, dict):
            if dataclasses.is_dataclass(self.moe):
                self.moe = dataclasses.asdict(self.moe)  # type: ignore[arg-type]
            else:
                raise TernkitError("moe must be a mapping of MoEConfig fields (or null); e.g. {num_experts: 8, top_k: 2}.")
        if self.moe is not None:
            try:
                from ternkit.models.moe import MoEConfig
            except ImportError:  # pragma: no cover - MoE block not installed; checked when a block is built
                MoEConfig = None  # type: ignore[assignment,misc]
            if MoEConfig is not None:
                MoEConfig.from_dict(dict(self.moe))  # unknown or invalid MoE keys fail here, naming the key
        if self.tie_embeddings and "head" in self.ternary:
            raise TernkitError("a tied LM head cannot be ternary; drop 'head' from ternary or set tie_embeddings false.")
        self.layer_config()  # validates the mLSTM fields (widths, gate mode, backend)

    def ffn_kinds(self) -> list[str]:
        """FFN kind of each block, a list of length ``n_blocks``."""
        if isinstance(self.ffn, tuple):
            return list(self.ffn)
        return [self.ffn] * self.n_blocks  # type: ignore[list-item]

    def layer_config(self) -> MLSTMLayerConfig:
        """The MLSTMLayerConfig every block's mLSTM layer is built from."""
        return MLSTMLayerConfig(
            d_model=self.d_model, n_heads=self.n_heads, proj_factor=self.proj_factor, conv_kernel=self.conv_kernel,
            qkv_blocksize=self.qkv_blocksize, chunk_size=self.chunk_size, gate_mode=self.gate_mode,
            memory_backend=self.memory_backend, target_sparsity=self.target_sparsity,
            ternary=tuple(n for n in self.ternary if n in _LAYER_PROJECTIONS), ternary_scale=self.ternary_scale,
            ternary_group_size=self.ternary_group_size, act_bits=self.act_bits, bias=self.bias,
            norm_eps=self.norm_eps, dropout=self.dropout,
            forget_bias_init=self.forget_bias_init, n_blocks=self.n_blocks,
        )
