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

__all__ = ["interleaved", "machine_info", "bench_moe_vs_dense"]


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


def bench_moe_vs_dense(experts: int = 12, top_k: int = 3, d_model: int = 256, hidden: int = 256,
                       tokens: int = 4096, mode: str = "fwd", repeats: int = 7, warmup: int = 1,
                       ternary: bool = True, seed: int = 0) -> dict[str, Any]:
    """MoE FFN (top-k dispatch) vs every expert on every token, same block, same tokens (1, T, D), interleaved.

    ``mode="fwd"``: inference, ternary weights frozen once on both sides, no grad.
    ``mode="fwdbwd"``: a training step without the optimizer (latent weights ternarized in every
    call on both sides). Returns medians, ``ratio`` = dense / moe (> 1: MoE faster), the ideal
    E / k and the max |difference| of the two outputs (they agree in dropless mode).
    """
    from ternkit.models.moe import MoEConfig, MoEFFN

    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    torch.manual_seed(seed)
    block = MoEFFN(d_model, MoEConfig(experts=experts, top_k=top_k, hidden=hidden, ternary=ternary))
    x = torch.randn(1, tokens, d_model)
    r = torch.randn(1, tokens, d_model)
    if mode == "fwd":
        block.freeze()

        def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
            def go() -> None:
                with torch.no_grad():
                    fn(x)
            return go
    else:
        block.train()
        xg = x.clone().requires_grad_(True)

        def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
            def go() -> None:
                block.zero_grad(set_to_none=True)
                xg.grad = None
                (fn(xg) * r).sum().backward()
            return go
    with torch.no_grad():
        max_diff = float((block(x) - block.forward_dense(x)).abs().max())
    res = interleaved({"dense": run(block.forward_dense), "moe": run(block)}, baseline="dense", repeats=repeats,
                      warmup=warmup)
    return {"experts": experts, "top_k": top_k, "d_model": d_model, "hidden": hidden, "tokens": tokens, "mode": mode,
            "ternary": ternary, "repeats": repeats, "threads": torch.get_num_threads(),
            "moe_s": res["median_s"]["moe"], "dense_s": res["median_s"]["dense"], "ratio": res["ratio"]["moe"],
            "ideal": experts / top_k, "max_abs_diff": max_diff, "samples_s": res["samples_s"]}
