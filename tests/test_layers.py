"""The package imports downward only: formats -> ops -> modules -> models -> recipe -> train / export -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

import ternkit

ROOT = Path(ternkit.__file__).parent

# Lower number = lower layer; a module may import its own layer or any lower one, never a higher one.
LAYERS: dict[str, int] = {
    "errors": 0, "schema": 0,
    "quant": 1,
    "ops": 2,
    "modules": 3,
    "models": 4,
    "recipe": 5, "checkpoint": 5, "tokenizer": 5, "data": 5,
    "train": 6, "export": 6,
    "bench": 7, "inspect": 7, "generate": 7, "parity": 7, "eval": 7,
    "cli": 8,
}


def _layer_of(module: str) -> int | None:
    """Layer of a dotted ternkit module name such as ``ternkit.ops.mlstm`` (None for the package root)."""
    parts = module.split(".")
    if parts[0] != "ternkit" or len(parts) < 2 or parts[1] not in LAYERS:
        return None  # the package root and its attributes (__version__, load_packed) sit beside every layer
    return LAYERS[parts[1]]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ternkit import in a source file, lazy (in-function) imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ternkit"):
            names = [node.module] if node.module != "ternkit" else [f"ternkit.{a.name}" for a in node.names]
            if node.module in ("ternkit.ops", "ternkit.quant", "ternkit.modules", "ternkit.models", "ternkit.train",
                               "ternkit.cli"):
                names = [node.module]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("ternkit")]
    return out


def test_every_package_folder_has_a_layer() -> None:
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS"


# Same-layer packages that must not lean on each other: both read checkpoints and tokenizers from below.
APART = {("train", "export"), ("export", "train")}


def test_imports_point_downward_only() -> None:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        own = _layer_of(".".join(rel.parts).removesuffix(".__init__"))
        if own is None:
            continue
        for line, mod in _imports(path):
            target = _layer_of(mod)
            if target is not None and (target > own or (rel.parts[1].removesuffix(".py") if len(rel.parts) > 1 else "",
                                                         mod.split(".")[1]) in APART):
                bad.append(f"{rel}.py:{line} imports {mod}")
    assert not bad, "upward imports:\n" + "\n".join(bad)
