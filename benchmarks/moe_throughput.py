"""MoE FFN throughput: sparse top-k dispatch vs running every expert densely, in one process, interleaved.

What is measured, for each (E, k): the same ``MoEFFN`` (same router, same expert modules) run two ways
on the same tokens:

- ``moe``: :meth:`MoEFFN.forward`, top-k sort-by-expert dispatch (router, sort, one host sync,
  one matmul chain per expert slice, index_add back);
- ``dense``: :meth:`MoEFFN.forward_dense`, every token through every expert, weighted by the
  (zero outside the top-k) gate matrix; same outputs in dropless mode.

``fwd`` is inference: ``freeze()`` ternarizes each expert's weights once, so both sides do the same
per-expert matmuls on cached ternary weights, under ``torch.no_grad``. ``fwd+bwd`` is training: the
latent weights are ternarized (STE) in every call, on both sides, and the backward of
``sum(y * r)`` flows to the input, router and experts. Times are medians of interleaved repeats
(moe and dense alternate, the order flipping each repeat), so machine noise hits both sides alike.

    python benchmarks/moe_throughput.py                # the three configurations from issue 4
    python benchmarks/moe_throughput.py --json out.json --configs 12x3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

from ternkit.models.moe import MoEConfig, MoEFFN

DEFAULT_CONFIGS = ("12x3", "8x2", "64x8")


def _time_once(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_moe_vs_dense(experts: int = 12, top_k: int = 3, d_model: int = 256, hidden: int = 256,
                       tokens: int = 4096, mode: str = "fwd", repeats: int = 5, warmup: int = 1,
                       ternary: bool = True, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Median seconds of the MoE FFN and of the dense all-experts baseline on ``tokens`` tokens (1, T, D).

    ``mode`` is ``"fwd"`` (frozen ternary weights, no grad) or ``"fwdbwd"`` (training step without
    the optimizer). Returns a dict with both medians, all samples, ``ratio`` = dense / moe, the
    ideal E / k, ``ratio_paired`` (median of per-repeat dense/moe ratios), ``ratio_min`` (best/best), and
    the max |difference| between the two outputs (a correctness check).
    """
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = MoEConfig(experts=experts, top_k=top_k, hidden=hidden, ternary=ternary)
    block = MoEFFN(d_model, cfg)
    x = torch.randn(1, tokens, d_model)
    r = torch.randn(1, tokens, d_model)

    if mode == "fwd":
        block.freeze()

        def run_moe() -> None:
            with torch.no_grad():
                block(x)

        def run_dense() -> None:
            with torch.no_grad():
                block.forward_dense(x)
    else:
        block.train()
        xg = x.clone().requires_grad_(True)

        def step(fn: Any) -> None:
            block.zero_grad(set_to_none=True)
            xg.grad = None
            (fn(xg) * r).sum().backward()

        def run_moe() -> None:
            step(block)

        def run_dense() -> None:
            step(block.forward_dense)

    with torch.no_grad():
        max_diff = float((block(x) - block.forward_dense(x)).abs().max())
    for _ in range(warmup):
        run_moe()
        run_dense()
    t_moe: list[float] = []
    t_dense: list[float] = []
    for i in range(repeats):
        if i % 2 == 0:
            t_moe.append(_time_once(run_moe))
            t_dense.append(_time_once(run_dense))
        else:
            t_dense.append(_time_once(run_dense))
            t_moe.append(_time_once(run_moe))
    m_moe, m_dense = statistics.median(t_moe), statistics.median(t_dense)
    # Ratio of each adjacent (moe, dense) pair, then the median: robust to load drifting between repeats.
    pair_ratio = statistics.median(d / m for d, m in zip(t_dense, t_moe))
    return {
        "experts": experts, "top_k": top_k, "d_model": d_model, "hidden": hidden, "tokens": tokens,
        "mode": mode, "ternary": ternary, "repeats": repeats, "threads": torch.get_num_threads(),
        "moe_s": m_moe, "dense_s": m_dense, "ratio": m_dense / m_moe, "ratio_paired": pair_ratio,
        "ratio_min": min(t_dense) / min(t_moe), "ideal": experts / top_k,
        "moe_tokens_per_s": tokens / m_moe, "dense_tokens_per_s": tokens / m_dense,
        "moe_samples_s": t_moe, "dense_samples_s": t_dense, "max_abs_diff": max_diff,
    }


def _parse_config(s: str) -> tuple[int, int]:
    try:
        e, k = s.lower().split("x")
        return int(e), int(k)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"config {s!r} must look like 12x3 (experts x top_k)") from err


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark grid, print a table, optionally write JSON; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", type=_parse_config, default=[_parse_config(c) for c in DEFAULT_CONFIGS],
                   help="experts x top_k, e.g. 12x3 8x2 64x8")
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwdbwd"), default=["fwd", "fwdbwd"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--float-experts", action="store_true", help="nn.Linear experts instead of TernaryLinear")
    p.add_argument("--json", type=str, default=None, help="write the results to this JSON file ('-' = stdout)")
    a = p.parse_args(argv)

    results = []
    for e, k in a.configs:
        for mode in a.modes:
            res = bench_moe_vs_dense(e, k, a.d_model, a.hidden, a.tokens, mode, a.repeats, a.warmup,
                                     ternary=not a.float_experts, threads=a.threads)
            results.append(res)
            print(f"E={e:3d} k={k} {mode:7s} moe {res['moe_s'] * 1e3:9.1f} ms  dense {res['dense_s'] * 1e3:9.1f} ms  "
                  f"ratio {res['ratio']:5.2f}x (paired {res['ratio_paired']:5.2f}x, min {res['ratio_min']:5.2f}x, "
                  f"ideal {res['ideal']:.2f}x)  |diff| {res['max_abs_diff']:.1e}",
                  flush=True)
    if a.json:
        doc = {"benchmark": "moe_throughput", "torch": torch.__version__, "machine": platform.processor()
               or platform.machine(), "python": sys.version.split()[0], "results": results}
        text = json.dumps(doc, indent=2)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
