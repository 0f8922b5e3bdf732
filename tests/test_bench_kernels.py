"""Kernel, STC-write and decoding benchmarks (tiny sizes), LM.stream, streamed generate text, and the bench CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ternkit.bench import (
    _crossover,
    bench_generate,
    bench_kernels,
    bench_stc,
    dense_baseline,
    generate_model_config,
    interleaved_per_call,
    stc_like,
)
from ternkit.cli.main import app
from ternkit.errors import TernkitError

from conftest import flat as _flat

runner = CliRunner()




# --- harness -----------------------------------------------------------------------------------------


def test_interleaved_per_call_loops_fast_callables_and_reports_per_call_time() -> None:
    calls = {"slow": 0, "fast": 0}

    def slow() -> None:
        calls["slow"] += 1
        time.sleep(0.002)

    def fast() -> None:
        calls["fast"] += 1

    res = interleaved_per_call({"slow": slow, "fast": fast}, "slow", repeats=3, warmup=1, target_s=0.01)
    assert res["inner"]["fast"] > 10 * res["inner"]["slow"] and res["inner"]["slow"] >= 1
    # 1 + 3 calibration calls, then (warmup + repeats) samples of `inner` calls each.
    assert calls["fast"] == 4 + 4 * res["inner"]["fast"]
    assert 0.0015 < res["median_s"]["slow"] < 0.02
    assert res["ratio"]["fast"] > 10 and res["ratio"]["slow"] == 1.0
    assert all(len(v) == 3 for v in res["samples_s"].values())


def test_stc_like_has_exact_density_and_two_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = stc_like((2, 3, 40), 0.25, g, alpha=0.7)
    assert x.shape == (2, 3, 40)
    assert ((x != 0).sum(-1) == 10).all()
    assert torch.allclose(x[x != 0].abs(), torch.tensor(0.7))
    assert (x > 0).any() and (x < 0).any()
    assert ((stc_like((1, 1, 8), 0.01, g) != 0).sum() == 1)  # at least one non-zero entry


def test_crossover_is_highest_density_that_still_wins() -> None:
    rows = [{"density": 1.0, "r": 0.5}, {"density": 0.5, "r": 1.2}, {"density": 0.25, "r": 3.0},
            {"density": 0.1, "r": 0.9}]
    assert _crossover(rows, "r") == 0.5
    assert _crossover([{"density": 0.1, "r": 0.9}], "r") is None


# --- kernels ---------------------------------------------------------------------------------------


def test_bench_kernels_tiny_agrees_with_twin_and_fp32() -> None:
    r = bench_kernels(out_features=48, in_features=200, batches=(1, 3), act_bits=(8, None), repeats=2)
    rows = r["results"]
    assert [(x["batch"], x["act_bits"]) for x in rows] == [(1, 8), (1, 0), (3, 8), (3, 0)]
    for x in rows:
        assert x["ternary_s"] > 0 and x["dense_s"] > 0
        assert x["ratio"] == pytest.approx(x["dense_s"] / x["ternary_s"])
        assert x["max_abs_diff"] < 1e-3
    assert rows[0]["goal"] == 8.0 and isinstance(rows[0]["met"], bool)
    assert rows[2]["goal"] is None and rows[2]["met"] is None
    float_rows = [x for x in rows if x["act_bits"] == 0]
    assert all(x["vs_dense"] < 1e-5 for x in float_rows)  # float activations: same numbers as F.linear
    assert all(x["vs_dense"] < 0.05 for x in rows)  # int8 activations: close
    assert isinstance(r["op"]["compiled"], bool)


# --- STC write -------------------------------------------------------------------------------------


def test_bench_stc_tiny_counts_and_exactness() -> None:
    r = bench_stc(dh=(32,), densities=(1.0, 0.25), heads=2, batch=1, repeats=2)
    rows = r["results"]
    assert [x["density"] for x in rows] == [1.0, 0.25]
    for x in rows:
        nk, nv = x["nnz_k"] // 2, x["nnz_v"] // 2
        assert nk == round(x["density"] * 32) and x["written"] == 2 * nk * nv
        assert x["decayed"] == 0  # f' = 1: no decay pass
        assert x["write_max_abs_diff"] == 0.0 and x["twin_equal"]
        assert x["step_max_abs_diff"] < 1e-5
        assert x["write_dense_form"] in ("dense_addcmul", "dense_baddbmm")
        assert x["write_dense_s"] == min(x["write_dense_addcmul_s"], x["write_dense_baddbmm_s"])
        assert x["write_ratio"] == pytest.approx(x["write_dense_s"] / x["write_sparse_s"])
    (s,) = r["summary"]
    assert s["dh"] == 32 and s["crossover_write"] in (None, 1.0, 0.25)
    assert s["met"] is None  # 10% is not in this grid


# --- decoding ---------------------------------------------------------------------------------------


def _tiny_lm(act_bits: int | None = 8):
    from ternkit.models.lm import XLSTMLM

    base = generate_model_config(d_model=32, blocks=2, vocab_size=64)
    cfg = base.model_copy(update={"quant": base.quant.model_copy(update={"act_bits": act_bits})})
    torch.manual_seed(0)
    return XLSTMLM(cfg)


def test_dense_baseline_computes_the_ternary_model_as_fp32_linears() -> None:
    from ternkit.models.mlstm import MLSTMLayer
    from ternkit.modules.linear import TernaryLinear

    model = _tiny_lm(act_bits=None).eval()
    tokens = torch.randint(0, 64, (2, 12))
    base = dense_baseline(copy.deepcopy(model))
    assert not any(isinstance(m, TernaryLinear) for m in base.modules())
    assert all(not m.sparse_decode for m in base.modules() if isinstance(m, MLSTMLayer))
    n_lin = sum(isinstance(m, TernaryLinear) for m in model.modules())
    assert n_lin == 2 * 5  # up, q, k, v, down per block
    with torch.no_grad():
        torch.testing.assert_close(base(tokens), model(tokens), atol=1e-5, rtol=1e-4)


def test_stream_yields_what_generate_returns() -> None:
    model = _tiny_lm().eval()
    prompt = torch.randint(0, 64, (1, 5))
    it = model.stream(prompt, 6, greedy=True)
    toks = [int(t[0]) for t in it]
    assert len(toks) == 6
    assert model.generate(prompt, 6)[0].tolist() == prompt[0].tolist() + toks
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled = [int(t[0]) for t in model.stream(prompt, 6, greedy=False, temperature=0.9, top_k=5, generator=g1)]
    assert model.generate(prompt, 6, greedy=False, temperature=0.9, top_k=5, generator=g2)[0, 5:].tolist() == sampled
    with pytest.raises(TernkitError):
        model.stream(torch.zeros(1, 0, dtype=torch.long), 3)  # checked at the call, not at the first next()


def test_bench_generate_tiny_reports_both_models() -> None:
    r = bench_generate(d_model=32, blocks=1, prompt_tokens=4, new_tokens=4, vocab_size=64, repeats=1)
    assert r["decode_tps"]["fp32"] > 0 and r["decode_tps"]["packed"] > 0
    assert r["ratio"] == pytest.approx(r["decode_tps"]["packed"] / r["decode_tps"]["fp32"])
    assert r["ternary_params"] == 32 * 128 + 3 * 64 * 64 + 64 * 32  # up, q, k, v, down (inner 64)
    assert all(0.0 <= r[k] <= 1.0 for k in ("greedy_match", "forced_match", "latent_match"))
    assert r["latent_cosine"] > 0.99  # one block: packing changes the logits only by rounding
    assert (r["first_divergence"] is None) == (r["greedy_match"] == 1.0)
    assert 0.0 < r["skip_fraction"] <= 1.0  # STC thresholds were calibrated: the sparse write skips work
    assert len(r["decode_s"]["packed"]) == 1


# --- streamed text ------------------------------------------------------------------------------------


class _ScriptedModel:
    """Stands in for an LM: stream() yields fixed token ids (bytes of a UTF-8 text)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def stream(self, tokens, max_new_tokens, **kwargs):  # noqa: ANN001, ANN201
        for t in self.ids[:max_new_tokens]:
            yield torch.tensor([t])


def test_stream_text_holds_back_incomplete_utf8_and_joins_to_the_text() -> None:
    from ternkit.generate import stream_text

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    new = list("é ü → ok".encode())
    pieces: list[str] = []
    stats = stream_text(_ScriptedModel(new), decode, list(b"say: "), len(new), pieces.append, greedy=True)
    assert "".join(pieces) == "say: é ü → ok\n"
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[0] == "say: " and len(pieces) > 4  # streamed, not printed at the end
    assert stats["prompt_tokens"] == 5 and stats["new_tokens"] == len(new) and stats["decode_tokens"] == len(new) - 1
    assert stats["prefill_tps"] > 0 and stats["decode_tps"] > 0


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_bench_kernels_json_and_machine_caption(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    res = runner.invoke(app, ["bench", "kernels", "--out", "32", "--in", "128", "--batch", "1", "--batch", "2",
                              "--act-bits", "8", "--repeats", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "kernels" and len(rep["results"]) == 2
    assert rep["machine"]["torch"] == torch.__version__
    assert f"torch {torch.__version__}" in _flat(res.output) and "threads" in res.output


def test_cli_bench_stc_and_generate_json(tmp_path: Path, keep_threads: None) -> None:
    out = tmp_path / "s.json"
    res = runner.invoke(app, ["bench", "stc", "--dh", "16", "--density", "0.5", "--density", "0.1", "--heads", "2",
                              "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert [r["density"] for r in rep["results"]] == [0.5, 0.1]
    assert rep["threads"] == 1 and rep["machine"]["torch_threads"] == 1
    assert "crossover_write" in rep["summary"][0] and "beats dense" in _flat(res.output)
    out2 = tmp_path / "g.json"
    res = runner.invoke(app, ["bench", "generate", "--d-model", "32", "--blocks", "1", "--tokens", "3",
                              "--prompt-tokens", "4", "--repeats", "1", "--json", str(out2)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out2.read_text())
    assert rep["d_model"] == 32 and rep["new_tokens"] == 3 and rep["decode_tps"]["packed"] > 0
    assert "packed 2-bit" in res.output and "greedy tokens equal" in _flat(res.output)


@pytest.mark.parametrize("argv", [
    ["bench", "kernels", "--act-bits", "4"],
    ["bench", "kernels", "--batch", "0"],
    ["bench", "stc", "--density", "1.5"],
    ["bench", "generate", "--tokens", "1"],
    ["bench", "generate", "--ffn", "moe"],
    ["bench", "generate", "--heads", "3", "--d-model", "32"],
    ["bench", "stc", "--repeats", "0"],
])
def test_cli_bench_bad_options_exit_2(argv: list[str]) -> None:
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


def test_cli_generate_streams_text_to_stdout_and_speed_to_stderr(cli, toy_run: Path) -> None:
    import re

    from ternkit.export import load_model
    from ternkit.tokenizer import load_tokenizer

    ckpt = toy_run / "last.ckpt"
    res = cli(["generate", str(ckpt), "def ", "-n", "8", "--temperature", "0"])
    assert res.code == 0, res.text
    model, _ = load_model(ckpt)
    tok = load_tokenizer(toy_run / "tokenizer.json")
    expect = tok.decode(model.generate(torch.tensor([tok.encode("def ")]), 8, greedy=True)[0].tolist())
    assert res.out == expect + "\n"
    m = re.search(r"prefill: (\d+) tokens, ([\d.]+) tok/s; decode: (\d+) tokens, ([\d.]+) tok/s", res.err)
    assert m is not None, res.err
    assert int(m.group(1)) == len(tok.encode("def ")) and int(m.group(3)) == 7
    assert float(m.group(2)) > 0 and float(m.group(4)) > 0
