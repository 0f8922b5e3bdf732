"""The compiled-op loader: opt-out, missing sources and failed builds fall back with one clear warning."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from ternkit.ops import compiled


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty op registry, an empty warning set and a private cache dir; returns a private csrc folder."""
    monkeypatch.setattr(compiled, "_REGISTRY", {})
    monkeypatch.setattr(compiled, "_WARNED", set())
    monkeypatch.setenv("TERNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TERNKIT_NO_EXT", raising=False)
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    monkeypatch.setattr(compiled, "CSRC", csrc)
    return csrc


def test_no_ext_env_forces_twins(fresh_registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fresh_registry / "some_op.cpp").write_text("#error must not be compiled\n")
    monkeypatch.setenv("TERNKIT_NO_EXT", "1")
    assert compiled.load_op("some_op") is False
    st = compiled.status()
    assert [(s.name, s.built) for s in st] == [("some_op", False)]
    assert "TERNKIT_NO_EXT" in st[0].detail
    assert not (Path(compiled.cache_dir())).exists()  # nothing was built


def test_missing_source_falls_back_with_one_warning(fresh_registry: Path) -> None:
    with pytest.warns(UserWarning, match="missing"):
        assert compiled.load_op("absent_op") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled.load_op("absent_op") is False  # cached outcome, no second warning


def test_failed_build_names_the_cause(fresh_registry: Path) -> None:
    (fresh_registry / "broken_op.cpp").write_text('#error "deliberately broken for the test"\n')
    with pytest.warns(UserWarning, match="build failed") as rec:
        assert compiled.load_op("broken_op") is False
    assert len(rec) == 1
    detail = compiled.status()[0].detail
    assert detail.startswith("build failed") and "error" in detail.lower()


def test_build_key_changes_with_the_source(fresh_registry: Path) -> None:
    src = fresh_registry / "k_op.cpp"
    src.write_text("int a;\n")
    k1 = compiled._build_key("k_op", [src], False)
    assert compiled._build_key("k_op", [src], False) == k1
    assert compiled._build_key("k_op", [src], True) != k1  # CUDA builds live apart
    src.write_text("int b;\n")
    assert compiled._build_key("k_op", [src], False) != k1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", compiled.OP_NAMES)
def test_cuda_sources_compile_without_torch(name: str, tmp_path: Path) -> None:
    # The launchers take raw pointers, so the CUDA half of every op is checked on machines without a GPU.
    src = compiled.CSRC / "cuda" / f"{name}.cu"
    out = tmp_path / f"{name}.o"
    res = subprocess.run(["nvcc", "-c", str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0


def test_truncated_cached_library_is_rebuilt(fresh_registry: Path) -> None:
    # An interrupted build can leave a broken .so in the cache: loading it fails, so it is rebuilt
    # (here the rebuild fails on purpose, fast, and the warning names the compiler error, not the .so).
    src = fresh_registry / "cut_op.cpp"
    src.write_text('#error "rebuild attempted"\n')
    key = compiled._build_key("cut_op", [src], compiled._with_cuda())
    build_dir = compiled.cache_dir() / f"cut_op_{key}"
    build_dir.mkdir(parents=True)
    (build_dir / f"ternkit_cut_op_{key}.so").write_bytes(b"not an ELF file")
    with pytest.warns(UserWarning, match="build failed"):
        assert compiled.load_op("cut_op") is False
    assert "rebuild attempted" in compiled.status()[0].detail
    assert not (build_dir / f"ternkit_cut_op_{key}.so").exists()
