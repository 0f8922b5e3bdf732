"""Typed settings: the pydantic base every config section uses, and pydantic errors turned into one sentence.

Both the recipe (``ternkit.recipe``) and the model configuration (``ternkit.models.config``) are
built from :class:`Section`: unknown keys are errors, assignments are re-validated, and
``Section.from_dict`` (``ModelConfig.from_dict({"n_heads": 3, ...})``) fails with one
:class:`~ternkit.errors.TernkitError` sentence naming the key instead of a pydantic traceback.
"""

from __future__ import annotations

import re
import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from ternkit.errors import TernkitError

__all__ = ["Section", "describe", "model_in", "one_sentence"]

_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
_SINGULAR = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
# Constraint errors whose own message is better than a type description.
_CONSTRAINT_ERRORS = {
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
    "too_short", "too_long", "string_too_short", "string_too_long",
}


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, assignments are re-validated, floats are finite.

    :meth:`from_dict` builds one from user data and turns a validation error into one
    :class:`TernkitError` sentence (the key path and what it must be); the plain constructor keeps
    pydantic's errors, so that a schema holding this section can name the full path.
    """

    # allow_inf_nan=False: no setting means anything at inf or nan (an lr of .inf trains to NaN at once),
    # so every float field of every section must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    #: Put before key paths in error sentences (e.g. "model." for the model config).
    _error_prefix: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Build from a mapping such as :meth:`to_dict` returns; a bad or unknown key raises one TernkitError sentence."""
        if not isinstance(d, dict):
            raise TernkitError(f"{cls._error_prefix.rstrip('.') or cls.__name__} must be a mapping of keys to values, "
                               f"got {type(d).__name__}.")
        try:
            return cls.model_validate(d)
        except ValidationError as exc:
            label = f"{cls._error_prefix.rstrip('.')} config" if cls._error_prefix else cls.__name__
            raise TernkitError(one_sentence(exc, cls, d, label, prefix=cls._error_prefix)) from None

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-safe data."""
        return self.model_dump(mode="json")


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class inside ``annotation`` (possibly wrapped in Optional), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = model_in(arg)
            if found is not None:
                return found
    return None


def describe(tp: Any) -> str:
    """Plain-words description of a type annotation, e.g. "an integer or null"."""
    if tp is type(None):
        return "null"
    if tp in _SINGULAR:
        return _SINGULAR[tp]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping of keys"
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        vals = ", ".join(repr(a) for a in args)
        return vals if len(args) == 1 else f"one of {vals}"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    if origin in (list, tuple):
        inner = args[0] if args else Any
        if get_origin(inner) is Literal:
            return "a list drawn from " + ", ".join(repr(a) for a in get_args(inner))
        return f"a list of {_PLURAL.get(inner, 'values')}"
    return getattr(tp, "__name__", str(tp))


def _loc_to_field(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, Any]:
    """Map a pydantic error location to (dotted field path, field annotation); union tags and list indices fold into the field."""
    cls: type[BaseModel] | None = root
    parts: list[str] = []
    annotation: Any = root
    for seg in loc:
        if cls is not None and isinstance(seg, str) and seg in cls.model_fields:
            parts.append(seg)
            annotation = cls.model_fields[seg].annotation
            cls = model_in(annotation)
            continue
        break
    return ".".join(parts), annotation


def _lookup(raw: Any, path: str) -> Any:
    cur = raw
    for part in path.split(".") if path else []:
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


#: Error types a validator raises; at a section's location they come from a check that spans its keys.
_SPANNING_ERRORS = {"value_error", "assertion_error"}


def _mentions(text: str, key: str, section: str) -> bool:
    """Whether the error ``text`` names the dotted ``key``, in full or relative to ``section`` (``d_model``)."""
    rel = key[len(section) + 1:] if section and key.startswith(section + ".") else key
    return any(re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text) for name in (key, rel))


def _section_keys(path: str, annotation: Any) -> list[str]:
    """The dotted keys of the fields of the section at ``path`` whose type is ``annotation``."""
    section = model_in(annotation)
    return [f"{path}.{f}" if path else f for f in (section.model_fields if section is not None else ())]


def _blame(overridden: dict[str, str], path: str, text: str, spanning: Any, raw: Any,
           source: str) -> str:
    """Who an error at ``path`` is blamed on: ``--set`` overrides (joined by "and") or the recipe ``source``.

    An override of the key itself or of a section above it is blamed. A validator of a whole
    section (``spanning`` is its annotation, else None) checks several keys together, e.g. that
    d_model divides by n_heads: every override inside the section that its sentence names is
    blamed, so that two interacting ``--set`` are both shown, and keys it names that come from the
    file are added as "(with KEY from SOURCE)"; when it names no override, the file is blamed.
    """
    above = [p for p in overridden if path == p or path.startswith(p + ".")]
    if above:
        return f"--set {overridden[above[0]]}"
    inside = [p for p in overridden if p.startswith(path + ".") or (not path and spanning is not None)]
    if not inside:
        return source
    if spanning is None:
        return f"--set {overridden[inside[0]]}"
    keys = _section_keys(path, spanning)
    named = [p for p in inside if _mentions(text, p, path)]
    from_file = [k for k in keys if k not in overridden and _mentions(text, k, path) and _lookup(raw, k) is not None]
    if not named and any(_mentions(text, k, path) for k in keys):
        return source  # it names only keys the overrides did not touch: the file's values are at fault
    where = " and ".join(f"--set {overridden[p]}" for p in named or inside)  # naming no key: every override
    return where + (f" (with {', '.join(from_file)} from {source})" if from_file else "")


def one_sentence(exc: ValidationError, root: type[BaseModel], raw: Any, source: str,
                 overridden: dict[str, str] | None = None, prefix: str = "") -> str:
    """Turn a pydantic ValidationError of ``root`` into one sentence naming the key and what it must be.

    ``overridden`` maps dotted keys set on the command line to their ``--set`` text, so the
    sentence blames the override instead of the file; ``prefix`` is put before every key path
    (e.g. ``"model."`` when a model config is validated on its own).
    """
    overridden = overridden or {}
    seen: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        path, annotation = _loc_to_field(root, tuple(err["loc"]))
        if path in seen:  # a union reports once per member; one sentence per key is enough
            continue
        etype = err["type"]
        msg = str(err.get("msg", ""))
        shown = prefix + path
        if etype in ("value_error", "assertion_error"):
            text = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        elif etype == "missing":
            text = f"'{shown}' is required"
        elif etype == "extra_forbidden":
            section = (prefix + path).rstrip(".")
            text = (f"unknown key '{err['loc'][-1]}'" + (f" in '{section}'" if section else "") + "; remove it or use one of "
                    + ", ".join((model_in(annotation) or root).model_fields))
        elif etype == "finite_number":
            text = f"'{shown}' must be a finite number, got {err.get('input')!r}"
        elif etype in _CONSTRAINT_ERRORS:
            got = err.get("input")
            text = f"'{shown}' must be {msg.removeprefix('Input should be ').removeprefix('Value should have ')}, got {got!r}"
        else:
            got = _lookup(raw, path) if path else raw
            text = f"'{shown}' must be {describe(annotation)}, got {got!r}"
        where = _blame(overridden, path, text, annotation if etype in _SPANNING_ERRORS else None, raw, source)
        seen[path] = f"{where}: {text}"
    first = next(iter(seen.values()))
    more = len(seen) - 1
    first = first.rstrip(".")
    return first + (f" (and {more} more)." if more else ("" if first.endswith("?") else "."))
