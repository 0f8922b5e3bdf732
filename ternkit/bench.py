"""Benchmark harness: time competing callables in one process, interleaved, and report median ratios.

Shared machines are noisy; timing A then B in separate runs measures the noise. Here every
repeat runs each candidate once, the order rotating between repeats, and the report is the
median per candidate plus its ratio to the baseline (baseline time / candidate time, so > 1
means the candidate is faster).
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["interleaved", "machine_info"]


def interleaved(fns: dict[str, Callable[[], Any]], baseline: str, repeats: int = 7, warmup: int = 1) -> dict[str, Any]:
    """Median seconds of each callable over ``repeats`` interleaved rounds, and ratios against ``baseline``.

    Returns ``{"median_s": {name: s}, "samples_s": {name: [s, ...]}, "ratio": {name: baseline_s / s}}``.
    """
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(fns)}")
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in samples.items()}
    return {"median_s": med, "samples_s": samples, "ratio": {n: med[baseline] / med[n] for n in names}}


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: CPU model, cores, torch threads and version, CUDA device if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
