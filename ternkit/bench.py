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
import torch.nn.functional as F
from torch import nn

from ternkit.errors import TernkitError

__all__ = ["interleaved", "interleaved_per_call", "machine_info", "bench_moe_vs_dense", "bench_kernels", "bench_stc",
           "bench_generate", "bench_quality", "quality_recipes", "quality_diverged", "stc_like", "KERNEL_GOALS",
           "STC_WRITE_GOAL", "GENERATE_GOAL", "QUALITY_GOAL", "STEP_GOAL", "TWIN_MODEL", "bench_train_step",
           "QUALITY_VARIANTS", "QUALITY_TWIN", "QUALITY_BASE"]

#: Speed goals of the compiled ops: candidate speed-up over the fp32 torch baseline in the same run.
KERNEL_GOALS: dict[int, float] = {1: 8.0, 8: 2.0}  # batch -> ternary_linear vs F.linear
STC_WRITE_GOAL: tuple[float, float] = (0.10, 10.0)  # (density, write-alone speed-up over the dense update)
GENERATE_GOAL = 3.0  # decode tokens/s of the packed model over the fp32 model
QUALITY_GOAL = 1.03  # the flagship's val loss within this factor of the float twin's (same data, seed, steps)
STEP_GOAL = 1.25  # the main job's training step at most this factor of its float twin's


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


def interleaved_per_call(fns: dict[str, Callable[[], Any]], baseline: str, repeats: int = 7, warmup: int = 1,
                         target_s: float = 0.01) -> dict[str, Any]:
    """:func:`interleaved` for fast callables: each sample loops a callable enough times to last about ``target_s``.

    Microsecond ops are timed over a calibrated inner loop (the count per callable is in
    ``"inner"``) so that timer resolution and call jitter stay small; ``median_s`` and
    ``samples_s`` are per call.
    """
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        inner[name] = max(1, min(100_000, int(target_s / max(best, 1e-7))))

    def looped(fn: Callable[[], Any], n: int) -> Callable[[], None]:
        def go() -> None:
            for _ in range(n):
                fn()
        return go

    res = interleaved({k: looped(f, inner[k]) for k, f in fns.items()}, baseline, repeats=repeats, warmup=warmup)
    samples = {k: [t / inner[k] for t in v] for k, v in res["samples_s"].items()}
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"median_s": med, "samples_s": samples, "ratio": {k: med[baseline] / med[k] for k in med},
            "inner": inner}


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
    from ternkit.quant.spec import TernarySpec

    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    torch.manual_seed(seed)
    block = MoEFFN(d_model, MoEConfig(experts=experts, top_k=top_k, hidden=hidden), TernarySpec() if ternary else None)
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


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine of :func:`machine_info`: CPU, cores, torch threads, torch version (and GPU)."""
    info = machine_info() if info is None else info
    line = f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} threads, torch {info['torch']}"
    return line + (f", {info['cuda']}" if info.get("cuda") else "")


def _op_status(name: str) -> dict[str, Any]:
    """Whether compiled op ``name`` is built (building it if needed) and the detail recorded by ops.compiled."""
    from ternkit.ops import compiled

    built = compiled.load_op(name)
    detail = next((s.detail for s in compiled.status() if s.name == name), "")
    return {"compiled": bool(built), "detail": detail}


def _random_trits(out_features: int, in_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 trits (out, in) and alpha () of an absmean-ternarized Gaussian weight (about 31% zeros, as in training)."""
    from ternkit.quant.ternarize import absmean_alpha, trits_of

    w = torch.randn(out_features, in_features, generator=generator)
    alpha = absmean_alpha(w)
    return trits_of(w, alpha), alpha.reshape(()).float()


@torch.no_grad()
def bench_kernels(out_features: int = 4096, in_features: int = 4096, batches: tuple[int, ...] = (1, 8, 64),
                  act_bits: tuple[int | None, ...] = (8, None), repeats: int = 7, warmup: int = 1,
                  seed: int = 0) -> dict[str, Any]:
    """ternary_linear on 2-bit packed trits vs F.linear with the same weight alpha * T in fp32, x (batch, in).

    One case per (batch, act_bits): ``act_bits=8`` quantizes activations per token to int8 inside
    the kernel (what a ``act_bits=8`` model runs), ``None`` keeps them float. Both sides see the
    same x; ``ratio`` = F.linear time / ternary_linear time (> 1: ternary faster), ``goal`` the
    speed goal for that batch (None: report only). ``max_abs_diff`` compares the op with
    its pure-torch twin on the same input (the twin defines the numbers), ``vs_dense`` the
    relative max difference to F.linear (0 up to rounding with float activations).
    """
    from ternkit.ops.ternary_linear import ternary_linear, ternary_linear_reference
    from ternkit.quant.packing import pack_trits

    g = torch.Generator().manual_seed(seed)
    trits, alpha = _random_trits(out_features, in_features, g)
    packed = pack_trits(trits, "2bit")[0]
    scale = alpha.reshape(1)
    w = (trits.float() * alpha).contiguous()
    status = _op_status("ternary_linear")
    results = []
    for m in batches:
        x = torch.randn(m, in_features, generator=g)
        for ab in act_bits:
            def tern(x: torch.Tensor = x, ab: int | None = ab) -> torch.Tensor:
                return ternary_linear(x, packed, scale, in_features, act_bits=ab)

            def dense(x: torch.Tensor = x) -> torch.Tensor:
                return F.linear(x, w)

            y = tern()
            ref = ternary_linear_reference(x, packed, scale, in_features, act_bits=ab)
            yd = dense()
            res = interleaved_per_call({"dense": dense, "ternary": tern}, "dense", repeats=repeats, warmup=warmup)
            goal = KERNEL_GOALS.get(m)
            ratio = res["ratio"]["ternary"]
            results.append({
                "out_features": out_features, "in_features": in_features, "batch": m, "act_bits": ab or 0,
                "ternary_s": res["median_s"]["ternary"], "dense_s": res["median_s"]["dense"], "ratio": ratio,
                "goal": goal, "met": None if goal is None else bool(ratio >= goal),
                "max_abs_diff": float((y - ref).abs().max()),
                "vs_dense": float((y - yd).abs().max() / yd.abs().max().clamp(min=1e-12)),
                "inner": res["inner"], "samples_s": res["samples_s"],
            })
    return {"benchmark": "kernels", "op": status, "threads": torch.get_num_threads(), "repeats": repeats,
            "results": results}


def stc_like(shape: tuple[int, ...], density: float, generator: torch.Generator, alpha: float = 0.5) -> torch.Tensor:
    """STC-quantized vectors (..., DH): alpha * {-1, +1} at round(density * DH) random places per vector, else 0."""
    dh = shape[-1]
    nnz = min(dh, max(1, round(density * dh)))
    rows = int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1
    order = torch.rand(rows, dh, generator=generator).argsort(dim=-1)[:, :nnz]
    signs = torch.randint(0, 2, (rows, nnz), generator=generator).float() * 2 - 1
    out = torch.zeros(rows, dh)
    out.scatter_(1, order, signs * alpha)
    return out.reshape(shape)


def _crossover(rows: list[dict[str, Any]], key: str) -> float | None:
    """Highest density at which ``rows[key]`` (a speed-up over dense) is still > 1; None if it never is."""
    won = [r["density"] for r in rows if r[key] > 1.0]
    return max(won) if won else None


@torch.no_grad()
def bench_stc(dh: tuple[int, ...] = (256, 512), densities: tuple[float, ...] = (1.0, 0.5, 0.25, 0.10, 0.05),
              heads: int = 4, batch: int = 1, repeats: int = 7, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """STC sparse memory write vs the dense update, alone and inside the whole recurrent step, over DH x density.

    k, v (B, NH, DH) are STC-like (``density`` of each vector non-zero, see :func:`stc_like`) and
    f' = 1 (the common decoding case with the ternary forget gate), so the sparse write touches
    nnz(k) * nnz(v) entries of C. Write alone: ``stc_write`` (``write_op_s``: the bare compiled
    op without the Python dispatch, when built) vs the fastest of two dense torch
    forms of ``C = f' C + i' k v^T, n = f' n + i' k`` (``mul_`` + ``addcmul_``, ``mul_`` +
    ``baddbmm_``), all in place on (B, NH, DH, DH). Whole step: ``mlstm_recurrent_step(...,
    gate_mode="ternary", sparse_write=True, inplace=True)`` (what decoding runs) vs
    ``sparse_write=False, inplace=True`` (the dense decode: decay and write in place), whose read ``q C`` is
    dense on both sides. ``crossover`` per DH is the highest
    measured density at which the sparse side is still faster.
    """
    from ternkit.ops.mlstm import mlstm_recurrent_step
    from ternkit.ops.stc_write import stc_write, stc_write_reference

    g = torch.Generator().manual_seed(seed)
    status = _op_status("stc_write")
    results: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for d in dh:
        rows: list[dict[str, Any]] = []
        for dens in densities:
            shape = (batch, heads, d)
            k, v = stc_like(shape, dens, g), stc_like(shape, dens, g, alpha=0.3)
            i_s = torch.rand(batch, heads, generator=g) * 0.5 + 0.25
            f_s = torch.ones(batch, heads)
            c0 = torch.randn(batch, heads, d, d, generator=g) * 0.01
            n0 = torch.randn(batch, heads, d, generator=g) * 0.01
            # Same numbers on both sides first: the op against the dense formula.
            c_chk, n_chk = c0.clone(), n0.clone()
            counts = stc_write(c_chk, n_chk, k, v, i_s, f_s)
            c_ref = f_s[..., None, None] * c0 + i_s[..., None, None] * (k[..., :, None] * v[..., None, :])
            n_ref = f_s[..., None] * n0 + i_s[..., None] * k
            max_diff = max(float((c_chk - c_ref).abs().max()), float((n_chk - n_ref).abs().max()))
            c_tw, n_tw = c0.clone(), n0.clone()
            stc_write_reference(c_tw, n_tw, k, v, i_s, f_s)
            twin_equal = bool(torch.equal(c_tw, c_chk) and torch.equal(n_tw, n_chk))

            cs, ns = c0.clone(), n0.clone()
            ca, na = c0.clone(), n0.clone()
            cb, nb = c0.clone(), n0.clone()
            bh = batch * heads
            f4, f3 = f_s[..., None, None], f_s[..., None]

            def sparse() -> None:
                stc_write(cs, ns, k, v, i_s, f_s)

            def dense_addcmul() -> None:
                ik = k * i_s[..., None]
                ca.mul_(f4).addcmul_(ik.unsqueeze(-1), v.unsqueeze(-2))
                na.mul_(f3).add_(ik)

            def dense_baddbmm() -> None:
                ik = k * i_s[..., None]
                c = cb.view(bh, d, d)
                c.mul_(f_s.view(bh, 1, 1)).baddbmm_(ik.view(bh, d, 1), v.view(bh, 1, d))
                nb.mul_(f3).add_(ik)

            fns = {"dense_addcmul": dense_addcmul, "dense_baddbmm": dense_baddbmm, "sparse": sparse}
            if status["compiled"]:
                def sparse_op() -> None:  # the bare op: what the Python dispatch (checks, dict) costs on top
                    torch.ops.ternkit.stc_write(cs, ns, k, v, i_s, f_s)
                fns["sparse_op"] = sparse_op
            w = interleaved_per_call(fns, "dense_addcmul", repeats=repeats, warmup=warmup)
            best = min(("dense_addcmul", "dense_baddbmm"), key=lambda n: w["median_s"][n])

            # Whole step: f pre-activation 6 -> ternary gate 1; m = 0 >= i = -1 -> m' = m, f' = 1 exactly.
            q = torch.randn(shape, generator=g)
            ig = torch.full((batch, heads), -1.0)
            fg = torch.full((batch, heads), 6.0)
            st_s = (c0.clone(), n0.clone(), torch.zeros(batch, heads))
            st_d = (c0.clone(), n0.clone(), torch.zeros(batch, heads))
            h_s = mlstm_recurrent_step(q, k, v, ig, fg, state=tuple(t.clone() for t in st_s), gate_mode="ternary",
                                       sparse_write=True, inplace=True)[0]
            h_d = mlstm_recurrent_step(q, k, v, ig, fg, state=tuple(t.clone() for t in st_d), gate_mode="ternary",
                                       inplace=True)[0]
            step_diff = float((h_s - h_d).abs().max())

            def step_sparse() -> None:
                mlstm_recurrent_step(q, k, v, ig, fg, state=st_s, gate_mode="ternary", sparse_write=True, inplace=True)

            def step_dense() -> None:
                mlstm_recurrent_step(q, k, v, ig, fg, state=st_d, gate_mode="ternary", inplace=True)

            s = interleaved_per_call({"dense": step_dense, "sparse": step_sparse}, "dense", repeats=repeats,
                                     warmup=warmup)
            row = {
                "dh": d, "density": dens, "heads": heads, "batch": batch,
                "nnz_k": int((k != 0).sum()), "nnz_v": int((v != 0).sum()),
                "written": counts["written"], "decayed": counts["decayed"],
                "write_sparse_s": w["median_s"]["sparse"], "write_op_s": w["median_s"].get("sparse_op"),
                "write_dense_s": w["median_s"][best], "write_dense_form": best,
                "write_dense_addcmul_s": w["median_s"]["dense_addcmul"],
                "write_dense_baddbmm_s": w["median_s"]["dense_baddbmm"],
                "write_ratio": w["median_s"][best] / w["median_s"]["sparse"],
                "step_sparse_s": s["median_s"]["sparse"], "step_dense_s": s["median_s"]["dense"],
                "step_ratio": s["ratio"]["sparse"],
                "write_max_abs_diff": max_diff, "twin_equal": twin_equal, "step_max_abs_diff": step_diff,
            }
            rows.append(row)
        goal_rows = [r for r in rows if abs(r["density"] - STC_WRITE_GOAL[0]) < 1e-9]
        summary.append({
            "dh": d, "crossover_write": _crossover(rows, "write_ratio"),
            "crossover_step": _crossover(rows, "step_ratio"),
            "goal": STC_WRITE_GOAL[1], "goal_density": STC_WRITE_GOAL[0],
            "met": bool(goal_rows[0]["write_ratio"] >= STC_WRITE_GOAL[1]) if goal_rows else None,
        })
        results += rows
    return {"benchmark": "stc", "op": status, "threads": torch.get_num_threads(), "repeats": repeats,
            "results": results, "summary": summary}


class _Int8ActLinear(nn.Linear):
    """nn.Linear whose input is per-token absmax int8 fake-quantized first (fp32 math): y (..., out) from x (..., in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ternkit.quant.ternarize import act_quant_8bit

        return super().forward(act_quant_8bit(x))


def dense_baseline(model: nn.Module) -> nn.Module:
    """``model`` in place as its fp32 dense twin: each latent TernaryLinear becomes nn.Linear(alpha * T), dense writes.

    The twin computes the same function with the same ternarized weights, but as float matrices
    read in full on every token (a layer with ``act_bits=8`` fake-quantizes its input in fp32
    first, as the training layer does) and the dense STC memory write (``sparse_decode=False``):
    what the model costs without ternkit's kernels. Returns it in eval mode.
    """
    from ternkit.models.mlstm import MLSTMLayer
    from ternkit.modules.linear import latent_ternary_layers, replace_module

    for name, mod in latent_ternary_layers(model).items():
        cls = _Int8ActLinear if mod.act_bits == 8 else nn.Linear
        lin = cls(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(mod.ternary_weight().detach())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.detach())
        replace_module(model, name, lin)
    for mod in model.modules():
        if isinstance(mod, MLSTMLayer):
            mod.sparse_decode = False
    return model.eval()


def generate_model_config(d_model: int = 1024, blocks: int = 6, ffn: str = "none", vocab_size: int = 256,
                          heads: int = 4) -> Any:
    """The decode-speed model: ternary up/qkv/down, STC sparse memory, ternary gate, int8 activations."""
    from ternkit.models.config import ModelConfig

    if ffn not in ("none", "ternary"):
        raise TernkitError(f"--ffn {ffn!r} is not supported; use none or ternary.")
    ternary = ["up", "qkv", "down"] + (["ffn"] if ffn == "ternary" else [])
    # from_dict: a width that does not fit the heads is one sentence from the config, not a traceback.
    return ModelConfig.from_dict(dict(vocab_size=vocab_size, d_model=d_model, n_blocks=blocks, n_heads=heads,
                                      ternary_projections=ternary, quant={"act_bits": 8}, memory_backend="stc_sparse",
                                      gate_mode="ternary", ffn=ffn, context_length=4096, tie_embeddings=False))


def _timed_stream(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds of new_tokens - 1 steps, greedy token ids) of one decoding run."""
    t0 = time.perf_counter()
    it = model.stream(prompt, new_tokens, greedy=True)
    ids = [int(next(it)[0])]
    t1 = time.perf_counter()
    ids += [int(t[0]) for t in it]
    return t1 - t0, time.perf_counter() - t1, ids


@torch.no_grad()
def bench_generate(d_model: int = 1024, blocks: int = 6, prompt_tokens: int = 32, new_tokens: int = 32,
                   ffn: str = "none", vocab_size: int = 256, heads: int = 4, repeats: int = 3,
                   seed: int = 0) -> dict[str, Any]:
    """Greedy decoding tokens/s of the 2-bit packed model vs the same model as fp32 dense, batch 1, interleaved.

    The model (random weights; :func:`generate_model_config`) first sees one training-mode forward
    on random tokens so its STC thresholds take their target sparsity, as after training. The
    baseline is :func:`dense_baseline` of a copy, the candidate ``pack_model(copy, "2bit")``.
    Each repeat decodes the same prompt on both (order alternating): prefill, then
    ``new_tokens - 1`` steps; decode tokens/s = steps / decode seconds (median over repeats).
    Agreement: ``greedy_match`` is the fraction of equal greedy tokens, ``first_divergence`` the
    index of the first differing one (None: all equal), ``forced_match`` the fraction of positions
    where both models' argmax agree when both read the same text (prompt + the fp32 model's output),
    ``logits_cosine`` the mean cosine of their logits there; ``latent_match`` / ``latent_cosine`` the
    same for the packed model against the model before packing (same int8 activations). A deep
    random-weight model is chaotic: int8 rounding, STC thresholds and ternary gates turn 1e-7
    differences into different tokens, so expect these to fall with depth (not a packing error).
    """
    if new_tokens < 2:
        raise TernkitError(f"--tokens must be at least 2 (one prefill token, then decode steps), got {new_tokens}.")
    if prompt_tokens < 1:
        raise TernkitError(f"--prompt-tokens must be a positive integer, got {prompt_tokens}.")
    import copy

    from ternkit.export import pack_model
    from ternkit.models.lm import XLSTMLM

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decode steps, got {new_tokens}")
    torch.manual_seed(seed)
    model = XLSTMLM(generate_model_config(d_model, blocks, ffn, vocab_size, heads))
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    model(torch.randint(0, vocab_size, (4, 64), generator=g))  # calibrate STC thresholds (tau)
    model.eval()
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=g)
    models = {"fp32": dense_baseline(copy.deepcopy(model)), "packed": pack_model(copy.deepcopy(model), "2bit")}
    ternary_params = sum(m.in_features * m.out_features for m in models["packed"].modules()
                         if type(m).__name__ == "PackedTernaryLinear")
    prefill: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    ids: dict[str, list[int]] = {}
    for name in models:  # warm-up: first-call costs (weight caches, op loading) stay out of the medians
        _timed_stream(models[name], prompt, 2)
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            p, d, out = _timed_stream(models[name], prompt, new_tokens)
            prefill[name].append(p)
            decode[name].append(d)
            ids[name] = out
    steps = new_tokens - 1
    tps = {k: steps / statistics.median(v) for k, v in decode.items()}
    prefill_tps = {k: prompt_tokens / statistics.median(v) for k, v in prefill.items()}
    a, b = ids["fp32"], ids["packed"]
    diverge = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
    text = torch.cat([prompt, torch.tensor([a])], dim=1)
    # Teacher-forced: every model reads the same text; the latent model (before packing, same int8
    # activations) separates packing error from the fp32 twin's float activations.
    logits = {k: m(text)[0, prompt_tokens - 1:-1] for k, m in (*models.items(), ("latent", model))}
    arg = {k: v.argmax(-1) for k, v in logits.items()}

    def cosine(a: str, b: str) -> float:
        return float(F.cosine_similarity(logits[a], logits[b], dim=-1).mean())

    skip = models["packed"].skip_fraction()
    return {
        "benchmark": "generate", "d_model": d_model, "blocks": blocks, "ffn": ffn, "vocab_size": vocab_size,
        "heads": heads, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
        "threads": torch.get_num_threads(), "ternary_params": ternary_params,
        "ops": {name: _op_status(name) for name in ("ternary_linear", "stc_write")},
        "decode_tps": tps, "prefill_tps": prefill_tps, "ratio": tps["packed"] / tps["fp32"],
        "prefill_ratio": prefill_tps["packed"] / prefill_tps["fp32"], "goal": GENERATE_GOAL,
        "met": bool(tps["packed"] / tps["fp32"] >= GENERATE_GOAL),
        "greedy_match": sum(x == y for x, y in zip(a, b)) / len(a), "first_divergence": diverge,
        "forced_match": float((arg["fp32"] == arg["packed"]).float().mean()), "logits_cosine": cosine("fp32", "packed"),
        "latent_match": float((arg["latent"] == arg["packed"]).float().mean()),
        "latent_cosine": cosine("latent", "packed"),
        "skip_fraction": skip, "decode_s": decode, "prefill_s": prefill,
    }


# ------------------------------------------------------------------------------------------ quality

#: The recipe whose model the quality benchmark measures (the main job); the float twin is derived from it.
QUALITY_BASE = "mlstm_stc"

#: The model overrides that make the main job's model its float twin (sigmoid gate, dense memory, float projections).
TWIN_MODEL: tuple[str, ...] = ("model.gate_mode=sigmoid", "model.memory_backend=dense", "model.ternary_projections=[]")

#: Overrides turning QUALITY_BASE into the float twin at the benchmark size (4 x 128, context 64, batch 12),
#: with one validation at the end, no sampling, no extra checkpoints and no TensorBoard.
QUALITY_TWIN: tuple[str, ...] = (
    *TWIN_MODEL,
    "model.n_blocks=4", "model.d_model=128", "model.n_heads=4", "model.context_length=64",
    "data.source=stdlib", "tokenizer.kind=byte",
    "optimizer.name=adamw", "optimizer.lr=2e-3", "optimizer.two_stage=true",
    "schedule.warmup_steps=50", "schedule.kind=cosine",
    "trainer.batch_size=12", "trainer.grad_accum=1", "trainer.val_batches=20", "trainer.log_every=10",
    "trainer.sample_every=0", "trainer.sample_tokens=1", "trainer.devices=1",
    "checkpoint.every_steps=0", "checkpoint.keep_best=false", "logging.tensorboard=false",
)

_MAIN = "@main"  # an override value meaning "this key's value in the QUALITY_BASE recipe"
_TERN = "model.ternary_projections=[up,qkv,down]"
_DGATE = "model.gate_mode=ternary_decay"

#: key -> (label, overrides relative to the float twin). One line per variant; "twin" must stay first.
QUALITY_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "twin": ("float twin", ()),
    "tern_absmean": ("ternary proj absmean", (_TERN, "quant.scale=absmean")),
    "tern_row": ("ternary proj per_row", (_TERN, "quant.scale=per_row")),
    "tern_lsq": ("ternary proj lsq", (_TERN, "quant.scale=lsq")),
    "tern_int8": ("ternary proj int8 act", (_TERN, "quant.scale=absmean", "quant.act_bits=8")),
    "tern_group": ("ternary proj group", (_TERN, "quant.scale=group")),
    "stc": ("stc memory", ("model.memory_backend=stc_sparse",)),
    "stc_k": ("stc memory, keys only", ("model.memory_backend=stc_sparse", "model.stc_quantize=k")),
    "stc_vec": ("stc memory, per-vector thresholds", ("model.memory_backend=stc_sparse", "model.stc_threshold=vector")),
    "stc_k_vec": ("stc keys only, per-vector thresholds", ("model.memory_backend=stc_sparse", "model.stc_quantize=k",
                                                          "model.stc_threshold=vector")),
    "stc_v50": ("stc memory, values 50% zeros", ("model.memory_backend=stc_sparse", "model.value_sparsity=0.5")),
    "stc_v0": ("stc memory, dense ternary values", ("model.memory_backend=stc_sparse", "model.value_sparsity=0.0")),
    "stc_s50": ("stc memory, 50% zeros", ("model.memory_backend=stc_sparse", "model.target_sparsity=0.5")),
    "tgate": ("ternary gate", ("model.gate_mode=ternary",)),
    "dgate": ("ternary decay gate", (_DGATE,)),
    "stc_tgate": ("stc + ternary gate", ("model.memory_backend=stc_sparse", "model.gate_mode=ternary")),
    "stc_dgate": ("stc + decay gate", ("model.memory_backend=stc_sparse", _DGATE)),
    "stc_k_dgate": ("stc keys only + decay gate", ("model.memory_backend=stc_sparse", "model.stc_quantize=k", _DGATE)),
    "all_tgate": ("all three, ternary gate", (_TERN, "model.memory_backend=stc_sparse", "model.gate_mode=ternary")),
    "all_dgate": ("all three, decay gate", (_TERN, "model.memory_backend=stc_sparse", _DGATE)),
    "updown_k_dgate": ("ternary up/down, stc keys only, decay gate", ("model.ternary_projections=[up,down]",
                                                                       "model.memory_backend=stc_sparse",
                                                                       "model.stc_quantize=k", _DGATE)),
    "all_k_dgate": ("all three, stc keys only, decay gate", (_TERN, "model.memory_backend=stc_sparse",
                                                             "model.stc_quantize=k", _DGATE)),
    "all_k_vec_dgate": ("all three, stc keys only per vector, decay gate", (_TERN, "model.memory_backend=stc_sparse",
                                                                            "model.stc_quantize=k",
                                                                            "model.stc_threshold=vector", _DGATE)),
    "flagship": ("flagship", (f"model.ternary_projections={_MAIN}", f"model.memory_backend={_MAIN}",
                              f"model.gate_mode={_MAIN}", f"model.forget_bias_init={_MAIN}", f"model.gate_soft_cap={_MAIN}",
                              f"model.stc_quantize={_MAIN}", f"model.stc_threshold={_MAIN}",
                              f"model.target_sparsity={_MAIN}", f"model.quant.scale={_MAIN}",
                              f"model.quant.act_bits={_MAIN}", f"model.quant.group_size={_MAIN}")),  # the main job's model
}

#: --set keys the benchmark owns (use steps= and seeds= instead).
_OWNED = {"trainer.max_steps": "--steps", "trainer.val_every": "--steps", "seed": "--seeds"}


def _resolve_main(overrides: tuple[str, ...], main: dict[str, Any]) -> list[str]:
    """``key=@main`` -> ``key=<the main recipe's value>`` (as JSON, which YAML reads back exactly)."""
    import json

    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if value == _MAIN:
            cur: Any = main
            for part in key.split("."):
                cur = cur[part]
            item = f"{key}={json.dumps(cur)}"
        out.append(item)
    return out


def _train_losses(run_dir: Any) -> list[float]:
    """Every train/loss logged in ``run_dir/logs/metrics.csv`` (empty when none was logged)."""
    import csv
    import math
    from pathlib import Path

    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        vals = [r.get("train/loss") or "" for r in csv.DictReader(fh)]
    out = [float(v) for v in vals if v.strip()]
    return [v for v in out if not math.isnan(v)]


def quality_diverged(val_loss: float, train_loss: float, logged_train: list[float]) -> bool:
    """A run diverged: its val loss or final train loss is not finite, or the final train loss exceeds 1.5x the
    lowest train loss it logged (``logged_train``; the final loss counts as logged)."""
    import math

    if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
        return True
    return train_loss > 1.5 * min([*[v for v in logged_train if math.isfinite(v)], train_loss])


def quality_recipes(steps: int = 300, variants: list[str] | None = None, sets: list[str] | tuple[str, ...] = (),
                    seed: int | None = None) -> dict[str, Any]:
    """The validated recipe of each requested variant (the twin first), before anything trains.

    Raises ``TernkitError`` for an unknown variant key, a bad ``--set`` or a ``--set`` of a key the
    benchmark owns (``trainer.max_steps``, ``trainer.val_every``, ``seed``).
    """
    from ternkit.recipe import load_recipe

    if steps < 1:
        raise TernkitError(f"--steps must be at least 1, got {steps}.")
    wanted = list(dict.fromkeys(variants or QUALITY_VARIANTS))
    unknown = [v for v in wanted if v not in QUALITY_VARIANTS]
    if unknown:
        raise TernkitError(f"unknown variant {unknown[0]!r}; the variants are: {', '.join(QUALITY_VARIANTS)}.")
    keys = ["twin"] + [v for v in wanted if v != "twin"]  # ratios need the twin, so it always runs, first
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in _OWNED:
            raise TernkitError(f"--set {item}: the benchmark sets {key} itself; use {_OWNED[key]} instead.")
    main = load_recipe(QUALITY_BASE).to_dict()
    fixed = [*QUALITY_TWIN, f"trainer.max_steps={steps}", f"trainer.val_every={steps}"]
    if seed is not None:
        fixed.append(f"seed={seed}")
    return {k: load_recipe(QUALITY_BASE, overrides=[*fixed, *_resolve_main(QUALITY_VARIANTS[k][1], main), *sets])
            for k in keys}


def bench_quality(steps: int = 300, seeds: tuple[int, ...] | list[int] = (1234,), variants: list[str] | None = None,
                  sets: list[str] | tuple[str, ...] = (), work_dir: Any = None,
                  on_run: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Train each variant of :data:`QUALITY_VARIANTS` on the same data, seed and steps; compare val loss and time.

    Every variant is the float twin (:data:`QUALITY_BASE` with :data:`QUALITY_TWIN`) plus its own
    overrides, then ``sets`` (``"a.b=value"``, applied to every variant). One validation at the end
    over the same fixed val batches. For each seed the variants train in the same order, the twin
    first. ``seconds`` is the wall time of the ``train()`` call alone: the corpus is tokenized once
    into a shared cache and a 2-step warm-up run takes the first-call costs (imports, op loading)
    before anything is timed. A run is ``diverged`` when its val loss is not finite or its final
    train loss exceeds 1.5x the lowest train loss it logged. ``work_dir``: where the run folders and
    the token cache go (kept); None -> a temporary folder deleted afterwards. ``on_run(event)`` is
    called before (``event["done"]`` False) and after (True, with the run's numbers) each training.

    Returns ``{"benchmark": "quality", "machine", "settings", "goal", "variants": [...]}``: per variant
    its key, label, overrides, per-seed runs (val_loss, train_loss, min_train_loss, seconds,
    diverged), the means, ``ratio`` (mean val loss / the twin's) and ``time_ratio`` (mean seconds /
    the twin's; > 1 means slower).
    """
    import math
    import shutil
    import tempfile
    from pathlib import Path

    from ternkit.data import prepare_text_data
    from ternkit.train.module import DivergenceError, NonFiniteLossError
    from ternkit.train.run import train

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise TernkitError("give at least one seed.")
    recipes = {s: quality_recipes(steps, variants, sets, seed=s) for s in seeds}
    keys = list(recipes[seeds[0]])
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="ternkit-quality-")
        root = Path(tmp)
    else:
        root = Path(work_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
    try:
        runs_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=root))  # fresh per call: never an old run's folder
        cache = recipes[seeds[0]]["twin"].data.cache_dir or str(root / "token-cache")

        def placed(recipe: Any, folder: str) -> Any:
            r = recipe.model_copy(deep=True)
            r.checkpoint.dir = str(runs_dir / folder)
            r.data.cache_dir = cache
            return r

        twin0 = placed(recipes[seeds[0]]["twin"], "warmup")
        if not twin0.data.synthetic:
            prepare_text_data(twin0.data, twin0.tokenizer, cache)
        warm = twin0.model_copy(deep=True)
        warm.trainer.max_steps = warm.trainer.val_every = 2
        warm.trainer.val_batches = 1
        train(warm, progress=False)
        shutil.rmtree(runs_dir / "warmup", ignore_errors=True)

        per: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        total, i = len(keys) * len(seeds), 0
        for seed in seeds:
            for key in keys:
                i += 1
                event = {"key": key, "label": QUALITY_VARIANTS[key][0], "seed": seed, "index": i, "total": total}
                if on_run is not None:
                    on_run({**event, "done": False})
                recipe = placed(recipes[seed][key], f"{key}-seed{seed}")
                t0 = time.perf_counter()
                stopped = None
                try:
                    res = train(recipe, progress=False)
                    val, final, steps = (float("nan") if res.val_loss is None else float(res.val_loss),
                                         float(res.train_loss), res.steps)
                except (DivergenceError, NonFiniteLossError) as err:
                    # The training guard stopped this run: a diverged variant is a result, not a failed benchmark.
                    stopped, val, final, steps = str(err), float("nan"), float("nan"), None
                seconds = time.perf_counter() - t0
                logged = [v for v in _train_losses(recipe.run_dir) + [final] if math.isfinite(v)]
                low = min(logged) if logged else float("nan")
                diverged = quality_diverged(val, final, logged)
                run = {"seed": seed, "val_loss": val, "train_loss": final, "min_train_loss": low,
                       "seconds": seconds, "diverged": bool(diverged), "steps": steps, "stopped": stopped}
                per[key].append(run)
                if on_run is not None:
                    on_run({**event, **run, "done": True})
                if tmp is not None:
                    shutil.rmtree(recipe.run_dir, ignore_errors=True)  # a temporary run's checkpoints are not kept
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def mean(vals: list[float]) -> float:
        return sum(vals) / len(vals)

    twin_loss = mean([r["val_loss"] for r in per["twin"]])
    twin_s = mean([r["seconds"] for r in per["twin"]])
    out = []
    for key in keys:
        runs = per[key]
        loss = mean([r["val_loss"] for r in runs])
        secs = mean([r["seconds"] for r in runs])
        out.append({
            "key": key, "label": QUALITY_VARIANTS[key][0], "overrides": list(QUALITY_VARIANTS[key][1]),
            "val_loss": loss, "seconds": secs, "ratio": 1.0 if key == "twin" else loss / twin_loss,
            "time_ratio": 1.0 if key == "twin" else secs / twin_s, "diverged": any(r["diverged"] for r in runs),
            "runs": runs,
        })
    from ternkit.recipe import load_recipe

    main = load_recipe(QUALITY_BASE).to_dict()
    for row in out:
        row["overrides"] = _resolve_main(QUALITY_VARIANTS[row["key"]][1], main)
    first = recipes[seeds[0]]["twin"]
    m, t = first.model, first.trainer
    settings = {"base": QUALITY_BASE, "steps": steps, "seeds": seeds, "variants": keys, "sets": list(sets),
                "work_dir": None if work_dir is None else str(work_dir), "threads": torch.get_num_threads(),
                "n_blocks": m.n_blocks, "d_model": m.d_model, "n_heads": m.n_heads, "context_length": m.context_length,
                "batch_size": t.batch_size, "val_batches": t.val_batches, "lr": first.optimizer.lr,
                "twin_overrides": list(QUALITY_TWIN)}
    return {"benchmark": "quality", "machine": machine_info(), "settings": settings, "goal": QUALITY_GOAL,
            "variants": out}


# ------------------------------------------------------------------------------------------ training step


def bench_train_step(sets: list[str] | tuple[str, ...] = (), repeats: int = 15, compile: bool = False) -> dict[str, Any]:
    """Training-step time of the main job's model vs its float twin: interleaved fwd + bwd + AdamW steps, medians.

    Both models are built from :data:`QUALITY_BASE` (the twin with :data:`TWIN_MODEL`) plus ``sets``,
    at the recipe's batch size and context, from the same seed, and step on the same random batch
    (``TWIN_MODEL`` is applied after ``sets``, so the twin stays float whatever is set).
    ``compile`` runs both through ``torch.compile`` (``nn.Module.compile``) first, as
    ``trainer.compile`` does; the first step of each (the compile) is timed apart. Returns
    ``{"benchmark": "step", "median_s", "samples_s", "ratio" (main / twin step time; > 1 slower),
    "goal", "met", "compile_s", "settings"}``.
    """
    from ternkit.models.lm import XLSTMLM
    from ternkit.modules.linear import ternary_modules
    from ternkit.recipe import load_recipe

    models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    kinds: dict[str, dict[str, Any]] = {}
    recipe = None
    for name, extra in (("twin", TWIN_MODEL), ("main", ())):
        # The twin's own overrides come last: no --set can make the baseline ternary.
        recipe = load_recipe(QUALITY_BASE, overrides=[*sets, *extra])
        torch.manual_seed(0)
        m = XLSTMLM(recipe.model.with_vocab(256)).train()
        if compile:
            m.compile()
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3))
        kinds[name] = {"gate_mode": recipe.model.gate_mode, "memory_backend": recipe.model.memory_backend,
                       "ternary_layers": sum(1 for _ in ternary_modules(m))}
    assert recipe is not None
    x = torch.randint(0, 256, (recipe.trainer.batch_size, recipe.model.context_length + 1))

    def stepper(name: str) -> Callable[[], None]:
        m, opt = models[name]

        def step() -> None:
            loss = F.cross_entropy(m(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    fns = {n: stepper(n) for n in models}
    first = {}
    for n, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[n] = time.perf_counter() - t0
    res = interleaved(fns, "twin", repeats=repeats, warmup=2)
    ratio = res["median_s"]["main"] / res["median_s"]["twin"]
    m = recipe.model
    return {"benchmark": "step", "median_s": res["median_s"], "samples_s": res["samples_s"], "ratio": ratio,
            "goal": STEP_GOAL, "met": bool(ratio <= STEP_GOAL), "compile": compile,
            "compile_s": first if compile else None, "threads": torch.get_num_threads(), "repeats": repeats,
            "settings": {"n_blocks": m.n_blocks, "d_model": m.d_model, "context_length": m.context_length,
                         "batch_size": recipe.trainer.batch_size, "sets": list(sets)}, "models": kinds}
