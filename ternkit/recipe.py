"""Recipes: one typed schema for a training run, YAML in, one clear sentence out when it is wrong.

A recipe is a YAML file with the sections ``model``, ``data``, ``tokenizer``, ``optimizer``,
``schedule``, ``trainer``, ``quant``, ``logging``, ``checkpoint`` plus ``name``, ``description``
and ``seed``. Every section is a pydantic model that forbids unknown keys, so a typo such as
``trainer.max_step`` fails with a did-you-mean instead of being silently ignored.

``load_recipe("recipes/mlstm_stc.yaml")`` loads a file; ``load_recipe("mlstm_stc")`` loads a
shipped recipe from anywhere. ``overrides=["trainer.max_steps=200"]`` (the CLI's ``--set``)
edits the raw YAML before validation, so an override is checked exactly like the file.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Literal, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ternkit.errors import TernkitError, read_utf8
from ternkit.models.config import PROJECTIONS, ModelConfig, MoEConfig
from ternkit.quant.spec import TernarySpec
from ternkit.schema import Section, model_in, one_sentence

__all__ = [
    "Recipe",
    "ModelConfig",
    "MoEConfig",
    "DataConfig",
    "ParityConfig",
    "MqarConfig",
    "TokenizerConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "QuantConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "PROJECTIONS",
    "STRATEGIES",
    "load_recipe",
    "recipe_from_dict",
    "recipe_dirs",
    "list_recipes",
    "resolve_recipe",
    "copy_recipe_file",
]

#: Longest run name: it names the folder runs/<name> and appears in file names, far below the 255-byte limit.
MAX_NAME_CHARS = 128
#: File systems limit one path component to 255 bytes (NAME_MAX); the margin is for names derived from it.
_MAX_NAME_BYTES = 200

#: The pre-unification place of the ternary-layer settings; a recipe's top-level ``quant:`` still
#: works and lands in ``model.quant``, the one place the setting lives.
_LEGACY_QUANT = "quant"


# ------------------------------------------------------------------------------------------ data


class ParityConfig(Section):
    """Parity of a bit string: train on lengths ``train_len_min..train_len_max``, evaluate at ``eval_len``."""

    train_len_min: int = Field(1, ge=1)
    train_len_max: int = Field(16, ge=1)
    eval_len: int = Field(64, ge=1)
    num_val: int = Field(512, ge=1, description="validation examples (fixed, seeded)")

    @model_validator(mode="after")
    def _lengths(self) -> "ParityConfig":
        if self.train_len_min > self.train_len_max:
            raise ValueError("data.parity.train_len_min must not exceed data.parity.train_len_max")
        return self


class MqarConfig(Section):
    """Multi-query associative recall (Zoology-style): key-value pairs, then some keys queried again."""

    vocab_size: int = Field(256, ge=8, description="keys use ids [1, vocab/2), values [vocab/2, vocab); 0 is filler")
    seq_len: int = Field(64, ge=4, description="input length of every example")
    num_kv_pairs: int = Field(8, ge=1)
    num_queries: int | None = Field(None, ge=1, description="None -> num_kv_pairs")
    num_val: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> "MqarConfig":
        q = self.num_queries if self.num_queries is not None else self.num_kv_pairs
        if q > self.num_kv_pairs:
            raise ValueError("data.mqar.num_queries must not exceed data.mqar.num_kv_pairs")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"data.mqar.num_kv_pairs needs at least that many distinct keys; raise data.mqar.vocab_size above {2 * self.num_kv_pairs + 2}")
        if 2 * self.num_kv_pairs + q > self.seq_len:
            raise ValueError(f"data.mqar.seq_len ({self.seq_len}) is too short for {self.num_kv_pairs} pairs and {q} queries")
        return self


class DataConfig(Section):
    """Where the training text comes from, how it is split and cached; or a synthetic task."""

    source: Literal["stdlib", "files", "hub", "parity", "mqar"] = "stdlib"
    paths: list[str] = Field(default_factory=list, description="files or globs (text, jsonl/json, parquet) for source=files")
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_chars: int | None = Field(6_000_000, ge=1, description="cap on corpus characters (None = no cap)")
    max_files: int | None = Field(None, ge=1, description="cap on files/documents read")
    cache_dir: str | None = Field(None, description="token cache; None -> <run dir>/data")
    parity: ParityConfig = Field(default_factory=ParityConfig)
    mqar: MqarConfig = Field(default_factory=MqarConfig)

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v: Any) -> Any:
        # `paths: corpus/*.txt` (or --set data.paths=corpus.txt) means a list of one.
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _source_needs(self) -> "DataConfig":
        if self.source == "files" and not self.paths:
            raise ValueError("data.source is 'files' but data.paths is empty; list the files or globs to train on")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.source is 'hub' but data.hub_name is not set")
        return self

    @property
    def synthetic(self) -> bool:
        """True for the synthetic tasks (no tokenizer, no text)."""
        return self.source in ("parity", "mqar")


class TokenizerConfig(Section):
    """Byte-level (256 ids, nothing to train), a byte-level BPE trained on the training split, or a tokenizer.json."""

    kind: Literal["byte", "bpe", "file"] = "byte"
    vocab_size: int = Field(4096, ge=257, description="BPE vocabulary size (kind=bpe)")
    min_frequency: int = Field(2, ge=1)
    path: str | None = Field(None, description="tokenizer.json, or a folder holding one (kind=file)")

    @model_validator(mode="after")
    def _file_has_path(self) -> "TokenizerConfig":
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind is 'file' but tokenizer.path is not set")
        return self


# ------------------------------------------------------------------------------ optimisation etc.


class OptimizerConfig(Section):
    """Optimizer; ``two_stage`` is BitNet b1.58's schedule (LR drops and weight decay goes to 0 at ``two_stage_at``)."""

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon momentum")
    two_stage: bool = False
    two_stage_at: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of max_steps where stage two starts")
    ternary_lr_scale: float = Field(1.0, gt=0.0, description="LR multiplier of the latent weights of ternary layers "
                                    "(AdamW; the schedule scales it like every other LR)")
    ternary_weight_decay: float | None = Field(None, ge=0.0, description="weight decay of the latent ternary "
                                               "weights (null = weight_decay)")
    ternary_lr_max: float | None = Field(None, gt=0.0, description="cap on the latent ternary weights' peak LR "
                                         "(lr * ternary_lr_scale): above about 2e-3 they flip too often to train "
                                         "(8 blocks at lr 3e-3, BENCHMARKS.md); null = no cap")

    @model_validator(mode="after")
    def _ternary_group_needs_adamw(self) -> "OptimizerConfig":
        if self.name != "adamw" and (self.ternary_lr_scale != 1.0 or self.ternary_weight_decay is not None
                                     or self.ternary_lr_max is not None):
            raise ValueError("ternary_lr_scale, ternary_lr_max and ternary_weight_decay apply to optimizer.name=adamw "
                             "only; use adamw or leave them unset")
        return self


class ScheduleConfig(Section):
    """Learning-rate schedule: linear warm-up, then cosine/linear decay to ``min_lr_ratio * lr`` or constant."""

    warmup_steps: int = Field(100, ge=0)
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


#: The strategy names Lightning (2.x) registers, plus "auto"; tests check each against Lightning's registry.
#: Listed here so a recipe is checked without importing Lightning (seconds) just to validate it.
STRATEGIES: tuple[str, ...] = (
    "auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "fsdp_cpu_offload", "single_device",
    "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
    "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme",
    "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true",
    "ddp_spawn_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true",
    "ddp_fork_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true",
    "ddp_notebook_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true",
    "single_tpu", "single_xla", "xla", "xla_debug",
)
#: The strategies a sentence lists; the other names are variants of these.
_MAIN_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "single_device")


class TrainerConfig(Section):
    """Lightning Trainer settings. ``batch_size`` is per device; steps are optimizer steps."""

    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0.0)
    precision: Literal["32", "bf16-mixed", "16-mixed", "bf16-true"] = "32"
    devices: Literal["auto"] | int | list[int] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    val_every: int = Field(200, ge=1, description="validate every N optimizer steps")
    val_batches: int = Field(20, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0, description="print a generated sample every N steps (0 = never)")
    sample_tokens: int = Field(128, ge=1)
    sample_prompt: str = "def "
    num_workers: int = Field(0, ge=0)
    compile: bool = Field(False, description="torch.compile the model's forward and backward: the first training "
                          "step and the first validation each compile a graph (a minute or two on CPU); later "
                          "steps run faster (`ternkit bench step --compile`, BENCHMARKS.md)")
    divergence_factor: float | None = Field(
        2.0, gt=1.0, description="a loss above this multiple of its best running level is a spike (null = off)")
    divergence_patience: int = Field(50, ge=1, description="consecutive spiking steps that count as divergence")
    divergence_stop: bool = Field(True, description="stop a diverged run like a NaN loss (false: only report it)")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, v: Any) -> Any:
        # YAML reads `precision: 32` as an int; Lightning's spelling is the string "32".
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("strategy")
    @classmethod
    def _strategy_known(cls, v: str) -> str:
        # Lightning lower-cases the name and would refuse an unknown one only after the data is built.
        name = v.strip().lower()
        if name not in STRATEGIES:
            close = difflib.get_close_matches(name, STRATEGIES, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"trainer.strategy {v!r} is not a Lightning strategy; use one of "
                             f"{', '.join(_MAIN_STRATEGIES)} (or a variant such as ddp_find_unused_parameters_true "
                             f"or deepspeed_stage_2){hint}")
        return name


QuantConfig = TernarySpec


class LoggingConfig(Section):
    """Where metrics go: a CSV log always, TensorBoard when installed (``"auto"``) or on demand."""

    csv: bool = True
    tensorboard: Literal["auto"] | bool = "auto"
    telemetry_every: int = Field(50, ge=1, description="trit/dead-zone telemetry every N steps")


class CheckpointConfig(Section):
    """Checkpoints: ``dir`` None -> runs/<name>; ``every_steps`` 0 -> only at validation and the end."""

    dir: str | None = None
    every_steps: int = Field(500, ge=0)
    keep_best: bool = True


class Recipe(Section):
    """A complete, validated training recipe."""

    name: str = "run"
    description: str = ""
    seed: int = 1234
    init_from: str | None = Field(None, description="a ternkit checkpoint (.ckpt) or export folder whose weights a new "
                                  "run starts from (float twin -> ternary, dense FFN -> MoE experts); a resume ignores it")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        # The name becomes the folder runs/<name>: one path component a file system accepts on every OS.
        size = len(v.encode("utf-8", errors="surrogatepass"))
        if len(v) > MAX_NAME_CHARS or size > _MAX_NAME_BYTES:
            raise ValueError(f"name is {len(v)} characters ({size} bytes in UTF-8) long; use a name of at most "
                             f"{MAX_NAME_CHARS} characters and {_MAX_NAME_BYTES} bytes")
        bad = next((c for c in v if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise ValueError(f"name {v!r} contains the control character {bad!r}; use letters, digits, '-', '_' or '.'")
        seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
        if not v.strip() or any(c in v for c in seps) or v in (".", ".."):
            raise ValueError(f"name {v!r} must be a plain folder name (no slashes, not empty, not '.' or '..')")
        return v

    @property
    def quant(self) -> TernarySpec:
        """The ternary-layer settings, which live in ``model.quant``."""
        return self.model.quant

    @property
    def run_dir(self) -> Path:
        """The run folder: ``checkpoint.dir`` if set, else ``runs/<name>`` (relative to the working directory)."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in) as plain YAML/JSON-safe Python data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text, loadable again with ``load_recipe``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def summary(self) -> str:
        """One line describing the architecture and data (used by ``ternkit recipes list``)."""
        m = self.model
        kinds = m.ffn_kinds()
        ffn = ",".join(dict.fromkeys(kinds))
        if "moe" in kinds:
            ffn += f" ({m.moe.experts}x top-{m.moe.top_k})"
        tern = "all" if m.ternary_projections == "all" else (",".join(m.ternary_projections) or "none")
        data = self.data.source if self.data.synthetic else f"{self.data.source}/{self.tokenizer.kind}"
        return (
            f"{m.arch} d{m.d_model}x{m.n_blocks} ctx{m.context_length}, {m.memory_backend} memory, "
            f"{m.gate_mode} gates, ffn {ffn}, ternary {tern}; {data}; {self.trainer.max_steps} steps"
        )


# ------------------------------------------------------------------------------- error messages


def _field_names(cls: type[BaseModel]) -> list[str]:
    return list(cls.model_fields)


def _all_leaf_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in cls.model_fields.items():
        sub = model_in(info.annotation)
        path = f"{prefix}{name}"
        out.append(path)
        if sub is not None:
            out.extend(_all_leaf_paths(sub, path + "."))
    return out


def _suggest(key: str, cls: type[BaseModel], prefix: str) -> str:
    """A did-you-mean for ``key`` unknown under section ``prefix`` (with its trailing dot)."""
    close = difflib.get_close_matches(key, _field_names(cls), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    # The right name in the wrong section (e.g. trainer.lr) is a common slip.
    elsewhere = [p for p in _all_leaf_paths(Recipe) if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'?"
    return f"; valid keys here: {', '.join(_field_names(cls))}."


def _check_unknown_keys(raw: dict[str, Any], cls: type[BaseModel], source: str, prefix: str = "") -> None:
    """Raise a did-you-mean ``TernkitError`` for the first key in ``raw`` that ``cls`` does not define."""
    for key, value in raw.items():
        if not isinstance(key, str) or key not in cls.model_fields:
            raise TernkitError(f"{source}: unknown key '{prefix}{key}'{_suggest(str(key), cls, prefix)}")
        sub = model_in(cls.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            _check_unknown_keys(value, sub, source, f"{prefix}{key}.")


def _spec_or_raw(d: Any) -> Any:
    """The validated TernarySpec dump of ``d`` (defaults filled), or ``d`` itself when it is not a valid one."""
    try:
        return TernarySpec.model_validate(d).model_dump()
    except ValidationError:
        return d


def _move_legacy_quant(raw: dict[str, Any], source: str) -> None:
    """Move a top-level ``quant:`` section into ``model.quant`` in place (one place for the setting)."""
    if _LEGACY_QUANT not in raw:
        return
    quant = raw.pop(_LEGACY_QUANT)
    model = raw.get("model")
    if model is None:
        model = raw["model"] = {}
    if not isinstance(model, dict):
        return  # validation names the bad model section
    if model.get("quant") not in (None, {}) and quant not in (None, {}) and _spec_or_raw(model["quant"]) != _spec_or_raw(quant):
        raise TernkitError(f"{source}: both 'quant' and 'model.quant' are set, differently; keep one (model.quant is "
                           "the place).")
    if quant is not None and not model.get("quant"):
        model["quant"] = quant


def _empty_sections_to_dicts(raw: dict[str, Any], cls: type[BaseModel]) -> None:
    """Treat a section written with nothing under it (``trainer:`` -> None) as an empty mapping, in place."""
    for key, value in list(raw.items()):
        info = cls.model_fields.get(key) if isinstance(key, str) else None
        sub = model_in(info.annotation) if info is not None else None
        if sub is None:
            continue
        if value is None:
            raw[key] = {}
        elif isinstance(value, dict):
            _empty_sections_to_dicts(value, sub)


# ------------------------------------------------------------------------------------ overrides


def _apply_override(raw: dict[str, Any], item: str, source: str = "recipe") -> str:
    """Apply one ``a.b.c=value`` override to ``raw`` (read from ``source``) in place; return the dotted key."""
    if "=" not in item:
        raise TernkitError(f"--set expects key=value (e.g. --set trainer.max_steps=200), got {item!r}.")
    key, _, text = item.partition("=")
    key = key.strip()
    if key == _LEGACY_QUANT or key.startswith(_LEGACY_QUANT + "."):
        key = "model." + key  # quant.scale=... means model.quant.scale=...
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise TernkitError(f"--set {item}: {key!r} is not a dotted key like trainer.max_steps.")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # an unparsable value stays a string; validation says what it should be
    cls: type[BaseModel] | None = Recipe
    free = False  # inside a free-form mapping such as model.extra: any key goes
    cur = raw
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if cls is not None and not free and part not in cls.model_fields:
            raise TernkitError(f"--set: unknown key '{prefix}{part}'{_suggest(part, cls, prefix)}")
        if i == len(parts) - 1:
            cur[part] = value
            break
        if cls is not None and not free:
            annotation = cls.model_fields[part].annotation
            cls = model_in(annotation)
            free = cls is None and get_origin(annotation) is dict
            if cls is None and not free:
                raise TernkitError(f"--set {item}: '{prefix}{part}' is a value, not a section, so it has no key "
                                   f"'{parts[i + 1]}'.")
        nxt = cur.get(part)
        if nxt is not None and not isinstance(nxt, dict):
            # Replacing the file's value would hide its mistake; say where it is instead.
            raise TernkitError(f"{source}: '{prefix}{part}' is {nxt!r}, not a mapping of keys, so --set {item} has "
                               f"nowhere to go; write '{prefix}{part}' as a section in the recipe.")
        if nxt is None:
            nxt = {}
            cur[part] = nxt
        cur = nxt
    return key


# ------------------------------------------------------------------------------ finding recipes


def recipe_dirs() -> list[Path]:
    """Folders searched for shipped recipes, in order: $TERNKIT_RECIPES, the repo's recipes/, installed copies."""
    here = Path(__file__).resolve().parent
    dirs = []
    if os.environ.get("TERNKIT_RECIPES"):
        dirs.append(Path(os.environ["TERNKIT_RECIPES"]))
    dirs += [
        here.parent / "recipes",  # a source checkout or editable install: the repo's top-level recipes/
        here / "recipes",  # package data, if a build copies them into the package
        Path(sys.prefix) / "share" / "ternkit" / "recipes",  # data-files of an installed wheel
    ]
    return [d for d in dirs if d.is_dir()]


def list_recipes() -> dict[str, Path]:
    """Shipped recipes by name (file stem), first folder of ``recipe_dirs()`` wins."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def resolve_recipe(path_or_name: str | os.PathLike[str]) -> Path:
    """The YAML file for a path (which must exist) or for a shipped recipe's name like ``"mlstm_stc"``."""
    text = os.fspath(path_or_name)
    p = Path(text).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise TernkitError(f"recipe '{text}' is a folder; pass a YAML file such as {text.rstrip('/')}/mlstm_stc.yaml.")
    shipped = list_recipes()
    looks_like_name = os.sep not in text and "/" not in text
    stem = p.name[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else p.name
    if looks_like_name and stem in shipped:
        return shipped[stem]
    close = difflib.get_close_matches(stem, list(shipped), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else (
        f"; pass a YAML path or one of the shipped recipes: {', '.join(shipped)}." if shipped
        else "; pass the path of a recipe YAML file.")
    raise TernkitError(f"recipe '{text}' not found (neither a file nor a shipped recipe name){hint}")


def copy_recipe_file(src: Path, target: Path, force: bool = False) -> None:
    """Copy the recipe file ``src`` to ``target`` byte for byte (comments kept), through a temporary file.

    Refuses an existing ``target`` without ``force``, ``target`` being ``src`` itself, and a missing
    folder; a failed write (full disk, read-only folder) leaves ``target`` as it was.
    """
    try:
        same = target.exists() and target.resolve() == src.resolve()
    except OSError:
        same = False
    if same:
        raise TernkitError(f"'{target}' is the recipe being copied ({src}); pass another destination to copy it to.")
    if target.exists() and not force:
        raise TernkitError(f"'{target}' already exists; pass --force to overwrite it or choose another destination.")
    if not target.parent.is_dir():
        raise TernkitError(f"folder '{target.parent}' does not exist; create it first or choose another destination.")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, target)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise TernkitError(f"cannot copy {src} to '{target}' ({err.strerror or type(err).__name__}); choose a "
                           "destination you can write to.") from None


# ---------------------------------------------------------------------------------------- loading


def recipe_from_dict(raw: dict[str, Any], overrides: Iterable[str] = (), source: str = "recipe") -> Recipe:
    """Validate a raw recipe mapping (after applying ``overrides``); errors are one ``TernkitError`` sentence."""
    if not isinstance(raw, dict):
        raise TernkitError(f"{source}: a recipe must be a mapping of sections (model:, data:, ...), got {type(raw).__name__}.")
    raw = copy.deepcopy(raw)  # the caller's dict stays untouched
    _move_legacy_quant(raw, source)
    _check_unknown_keys(raw, Recipe, source)
    _empty_sections_to_dicts(raw, Recipe)
    overridden: dict[str, str] = {}
    for item in overrides:
        overridden[_apply_override(raw, item, source)] = item
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise TernkitError(one_sentence(exc, Recipe, raw, source, overridden)) from None


#: PyYAML's message for a tag that safe_load has no constructor for (``!!python/object:...``, ``!foo``).
_NO_CONSTRUCTOR = re.compile(r"could not determine a constructor for the tag '([^']*)'")


def _read_recipe_text(path: Path, source: str) -> str:
    """The text of the recipe file ``path`` (shown as ``source``); TernkitError when unreadable or not UTF-8."""
    return read_utf8(path, f"recipe '{source}'", "check the path and its permissions.",
                     f"save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 {source} > fixed.yaml).")


def _parse_recipe_text(text: str, source: str) -> Any:
    """The YAML value of a recipe's text (safe_load); TernkitError for empty text, syntax errors and unsafe tags."""
    try:
        raw = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        # A control character such as NUL: not an indentation problem, and it has no line mark.
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        raise TernkitError(f"recipe '{source}' holds the control character 0x{char:02x} (at character {exc.position}), "
                           "which YAML does not allow; remove it, a recipe is plain text.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or "invalid YAML")
        tag = _NO_CONSTRUCTOR.search(problem)
        if isinstance(exc, yaml.constructor.ConstructorError) and tag:
            shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise TernkitError(f"{source}: the YAML tag '{shown}'{where} is unsafe or unsupported (recipes are "
                               "read with yaml.safe_load, which builds no Python objects); remove the tag and write a "
                               "plain value.") from None
        raise TernkitError(f"{source}: YAML syntax error{where}: {problem}; fix the file's indentation or quoting there.") from None
    if raw is None:
        # Nothing but comments or blank lines: training on every default is never what was meant.
        raise TernkitError(f"recipe '{source}' is empty; start from a shipped recipe (ternkit recipes copy mlstm_stc "
                           "my.yaml).")
    return raw


def load_recipe(path_or_name: str | os.PathLike[str], overrides: Iterable[str] = ()) -> Recipe:
    """Load, override and validate a recipe from a YAML path or a shipped recipe name.

    ``overrides`` are ``"a.b.c=value"`` strings; the value is parsed as YAML (so ``200``, ``3e-4``,
    ``true``, ``[dense, moe]`` get their types). ``name`` defaults to the file's stem.
    """
    path = resolve_recipe(path_or_name)
    source = os.fspath(path_or_name) if Path(os.fspath(path_or_name)).is_file() else str(path)
    raw = _parse_recipe_text(_read_recipe_text(path, source), source)
    if not isinstance(raw, dict):
        raise TernkitError(f"{source}: a recipe must be a mapping of sections (model:, data:, ...), got {type(raw).__name__}.")
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, overrides, source)
