"""``ternkit env``: what this machine offers ternkit (torch, threads, CPU features, CUDA, compiled ops)."""

from __future__ import annotations

import platform
from pathlib import Path

import typer
from rich.table import Table

from ternkit import __version__
from ternkit.cli.app import app, console, user_errors


def cpu_features() -> dict[str, bool]:
    """SIMD features ternkit's kernels care about, read from /proc/cpuinfo (Linux) or the platform."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    machine = platform.machine().lower()
    return {
        "AVX2": "avx2" in flags,
        "AVX-512": "avx512f" in flags,
        "AVX512-VNNI": "avx512_vnni" in flags,
        "NEON": "asimd" in flags or machine in ("arm64", "aarch64"),
    }


def env_report() -> dict[str, object]:
    """Collect the environment facts as a plain dict (also used by ``--json``)."""
    import torch

    from ternkit.ops import compiled

    for name in compiled.OP_NAMES:
        compiled.load_op(name)  # builds on first use (cached), so the table says which path each op takes
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"})
    return {
        "ternkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_features": cpu_features(),
        "cuda_devices": cuda,
        "compiled_ops": [{"name": s.name, "built": s.built, "detail": s.detail} for s in compiled.status()],
    }


@app.command("env")
@user_errors
def env_cmd(json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Print torch version, threads, CPU features, CUDA devices and which compiled ops are built."""
    rep = env_report()
    if json_out:
        import json

        console.print_json(json.dumps(rep))
        return
    t = Table(title="ternkit env", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for key in ("ternkit", "python", "platform", "torch", "torch_cpu_capability", "threads"):
        t.add_row(key, str(rep[key]))
    feats = rep["cpu_features"]
    assert isinstance(feats, dict)
    t.add_row("cpu features", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in feats.items()))
    cuda = rep["cuda_devices"]
    assert isinstance(cuda, list)
    t.add_row("cuda devices", "; ".join(f"{d['index']}: {d['name']} ({d['memory_gib']} GiB, sm {d['capability']})" for d in cuda) or "none")
    ops = rep["compiled_ops"]
    assert isinstance(ops, list)
    if ops:
        for o in ops:
            t.add_row(f"op {o['name']}", ("compiled" if o["built"] else "pure-torch twin") + (f" ({o['detail']})" if o["detail"] else ""))
    else:
        t.add_row("compiled ops", "none registered: every op runs its pure-torch version")
    console.print(t)
