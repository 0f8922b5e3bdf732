"""The benchmark harness: interleaving, medians, ratios; the MoE bench agrees with its dense baseline."""

from __future__ import annotations

import time

import pytest

from ternkit.bench import bench_moe_vs_dense, interleaved


def test_interleaved_ratio_orders_a_slow_and_a_fast_callable() -> None:
    calls: list[str] = []

    def slow() -> None:
        calls.append("slow")
        time.sleep(0.004)

    def fast() -> None:
        calls.append("fast")
        time.sleep(0.001)

    res = interleaved({"slow": slow, "fast": fast}, baseline="slow", repeats=5, warmup=1)
    assert len(res["samples_s"]["slow"]) == 5 and len(calls) == 12
    assert res["ratio"]["slow"] == 1.0
    assert res["ratio"]["fast"] > 1.5
    assert calls[2:4] == ["slow", "fast"] and calls[4:6] == ["fast", "slow"]  # order rotates per repeat


def test_interleaved_rejects_unknown_baseline() -> None:
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, baseline="b")


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_moe_bench_outputs_agree_and_report_ratio(mode: str) -> None:
    r = bench_moe_vs_dense(experts=4, top_k=1, d_model=32, hidden=32, tokens=256, mode=mode, repeats=3)
    assert r["max_abs_diff"] < 1e-5
    assert r["ideal"] == 4.0 and r["ratio"] > 0
    assert r["moe_s"] > 0 and r["dense_s"] > 0
