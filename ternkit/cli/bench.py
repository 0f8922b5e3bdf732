"""``ternkit bench``: in-process, interleaved benchmarks that report median ratios against a dense baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ternkit.cli.app import app, console, user_errors

bench_app = typer.Typer(help="Benchmarks: same process, interleaved repeats, median times, ratio vs dense.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _parse_ek(s: str) -> tuple[int, int]:
    from ternkit.errors import TernkitError

    try:
        e, k = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise TernkitError(f"config {s!r} must look like 12x3 (experts x top_k).") from None
    if not 1 <= k <= e:
        raise TernkitError(f"config {s!r}: top_k must lie in [1, experts].")
    return e, k


@bench_app.command("moe")
@user_errors
def bench_moe(
    configs: Optional[List[str]] = typer.Option(None, "--config", help="experts x top_k (repeatable); default 12x3, 8x2, 64x8."),
    modes: Optional[List[str]] = typer.Option(None, "--mode", help="fwd and/or fwdbwd (repeatable); default both."),
    d_model: int = typer.Option(256, "--d-model"),
    hidden: int = typer.Option(256, "--hidden", help="Expert hidden width."),
    tokens: int = typer.Option(4096, "--tokens"),
    repeats: int = typer.Option(7, "--repeats"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    float_experts: bool = typer.Option(False, "--float-experts", help="nn.Linear experts instead of ternary ones."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Top-k MoE FFN vs running every expert on every token (MoE throughput; the ideal speed-up is E/k)."""
    import torch

    from ternkit.bench import bench_moe_vs_dense, machine_info
    from ternkit.errors import TernkitError

    _setup(threads, repeats)
    grid = [_parse_ek(c) for c in (configs or ["12x3", "8x2", "64x8"])]
    modes = modes or ["fwd", "fwdbwd"]
    for m in modes:
        if m not in ("fwd", "fwdbwd"):
            raise TernkitError(f"--mode {m!r} is not a mode; use fwd or fwdbwd.")
    t = Table(title=f"MoE FFN vs all experts dense (D={d_model}, hidden={hidden}, {tokens} tokens, "
                    f"{torch.get_num_threads()} threads, median of {repeats})", caption=_caption())
    for col in ("E", "k", "mode", "moe ms", "dense ms", "ratio", "ideal", "max |diff|"):
        t.add_column(col, justify="right")
    results = []
    for e, k in grid:
        for mode in modes:
            r = bench_moe_vs_dense(e, k, d_model, hidden, tokens, mode, repeats, ternary=not float_experts)
            results.append(r)
            t.add_row(str(e), str(k), mode, f"{r['moe_s'] * 1e3:.1f}", f"{r['dense_s'] * 1e3:.1f}",
                      f"{r['ratio']:.2f}x", f"{r['ideal']:.2f}x", f"{r['max_abs_diff']:.1e}")
    console.print(t)
    if json_path is not None:
        json_path.write_text(json.dumps({"benchmark": "moe", "machine": machine_info(), "results": results}, indent=2))
        console.print(f"wrote {json_path}")


def _setup(threads: Optional[int], repeats: int) -> None:
    """Apply --threads and check --repeats (shared by every bench command)."""
    import torch

    from ternkit.errors import TernkitError

    if threads is not None:
        if threads < 1:
            raise TernkitError(f"--threads must be at least 1, got {threads}.")
        torch.set_num_threads(threads)
    if repeats < 1:
        raise TernkitError(f"--repeats must be at least 1, got {repeats}.")


def _caption(extra: str = "") -> str:
    from ternkit.bench import machine_line

    return machine_line() + (f"; {extra}" if extra else "")


def _write_json(json_path: Optional[Path], payload: dict) -> None:
    from ternkit.bench import machine_info

    if json_path is None:
        return
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**payload, "machine": machine_info()}, indent=2))
    console.print(f"wrote {json_path}")


def _us(s: float) -> str:
    return f"{s * 1e6:.1f}" if s < 1e-3 else f"{s * 1e6:.0f}"


def _goal(ratio: float, goal: Optional[float]) -> str:
    if goal is None:
        return "report"
    return f"[green]{goal:g}x met[/]" if ratio >= goal else f"[red]{goal:g}x missed[/]"


def _ints(values: Optional[List[int]], default: List[int], flag: str) -> List[int]:
    from ternkit.errors import TernkitError

    out = list(values or default)
    for v in out:
        if v < 1:
            raise TernkitError(f"{flag} must be a positive integer, got {v}.")
    return out


@bench_app.command("kernels")
@user_errors
def bench_kernels_cmd(
    batches: Optional[List[int]] = typer.Option(None, "--batch", help="Rows of x (repeatable); default 1, 8, 64."),
    out_features: int = typer.Option(4096, "--out", help="Output features N of the weight (N, K)."),
    in_features: int = typer.Option(4096, "--in", help="Input features K of the weight (N, K)."),
    act_bits: Optional[List[int]] = typer.Option(None, "--act-bits", help="8 (int8 activations) and/or 0 (float); "
                                                  "default both."),
    repeats: int = typer.Option(7, "--repeats"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """ternary_linear on 2-bit packed trits vs F.linear fp32 with the same weights, per batch size."""
    from ternkit.bench import bench_kernels
    from ternkit.errors import TernkitError

    _setup(threads, repeats)
    bs = _ints(batches, [1, 8, 64], "--batch")
    if out_features < 1 or in_features < 1:
        raise TernkitError("--out and --in must be positive integers.")
    abits = act_bits if act_bits else [8, 0]
    for a in abits:
        if a not in (0, 8):
            raise TernkitError(f"--act-bits {a} is not supported; use 8 or 0.")
    r = bench_kernels(out_features, in_features, tuple(bs), tuple(a or None for a in abits), repeats)
    op = r["op"]
    t = Table(title=f"ternary_linear {out_features}x{in_features} (2-bit packed) vs F.linear fp32, median of {repeats}",
              caption=_caption("compiled op" if op["compiled"] else f"pure-torch twin ({op['detail']})"))
    for col in ("batch", "act", "ternary us", "fp32 us", "ratio", "goal", "|diff| twin", "rel vs fp32"):
        t.add_column(col, justify="right")
    for row in r["results"]:
        act = "int8" if row["act_bits"] else "float"
        t.add_row(str(row["batch"]), act, _us(row["ternary_s"]), _us(row["dense_s"]),
                  f"{row['ratio']:.2f}x", _goal(row["ratio"], row["goal"]), f"{row['max_abs_diff']:.1e}",
                  f"{row['vs_dense']:.1e}")
    console.print(t)
    _write_json(json_path, r)


@bench_app.command("stc")
@user_errors
def bench_stc_cmd(
    dh: Optional[List[int]] = typer.Option(None, "--dh", help="Head width DH (repeatable); default 256 and 512."),
    densities: Optional[List[float]] = typer.Option(None, "--density", help="Non-zero fraction of k and v "
                                                     "(repeatable); default 1, 0.5, 0.25, 0.1, 0.05."),
    heads: int = typer.Option(4, "--heads", help="Memory heads NH."),
    batch: int = typer.Option(1, "--batch"),
    repeats: int = typer.Option(7, "--repeats"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """STC sparse memory write (and the whole recurrent step) vs the dense update, over head width and density."""
    from ternkit.bench import bench_stc
    from ternkit.errors import TernkitError

    _setup(threads, repeats)
    dhs = _ints(dh, [256, 512], "--dh")
    if heads < 1 or batch < 1:
        raise TernkitError("--heads and --batch must be positive integers.")
    dens = list(densities or [1.0, 0.5, 0.25, 0.10, 0.05])
    for d in dens:
        if not 0.0 < d <= 1.0:
            raise TernkitError(f"--density {d} must lie in (0, 1].")
    r = bench_stc(tuple(dhs), tuple(dens), heads, batch, repeats)
    op = r["op"]
    t = Table(title=f"STC sparse write vs dense update (f' = 1, B={batch}, NH={heads}), median of {repeats}",
              caption=_caption("compiled op" if op["compiled"] else f"pure-torch twin ({op['detail']})"))
    t.add_column("DH", justify="right")
    t.add_column("k, v density", justify="right")
    for col in ("write us", "dense write us", "write ratio", "step us", "dense step us", "step ratio"):
        t.add_column(col, justify="right")
    for row in r["results"]:
        t.add_row(str(row["dh"]), f"{row['density']:.0%}", _us(row["write_sparse_s"]), _us(row["write_dense_s"]),
                  f"{row['write_ratio']:.1f}x", _us(row["step_sparse_s"]), _us(row["step_dense_s"]),
                  f"{row['step_ratio']:.2f}x")
    console.print(t)
    diff = max(max(row["write_max_abs_diff"], row["step_max_abs_diff"]) for row in r["results"])
    exact = all(row["twin_equal"] for row in r["results"])
    console.print(f"max |sparse - dense| over all cases: {diff:.1e}; op equals its pure-torch twin bit for bit: "
                  f"{'yes' if exact else '[red]no[/]'}")
    for s in r["summary"]:
        cw = "never" if s["crossover_write"] is None else f"{s['crossover_write']:.0%}"
        cs = "never" if s["crossover_step"] is None else f"{s['crossover_step']:.0%}"
        met = "n/a" if s["met"] is None else ("[green]met[/]" if s["met"] else "[red]missed[/]")
        console.print(f"DH={s['dh']}: sparse write beats dense up to density {cw} (whole step: {cs}); "
                      f"goal >= {s['goal']:g}x at {s['goal_density']:.0%}: {met}")
    _write_json(json_path, r)


@bench_app.command("generate")
@user_errors
def bench_generate_cmd(
    d_model: int = typer.Option(1024, "--d-model"),
    blocks: int = typer.Option(6, "--blocks"),
    tokens: int = typer.Option(32, "--tokens", help="New tokens decoded per run (>= 2)."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens"),
    heads: int = typer.Option(4, "--heads"),
    ffn: str = typer.Option("none", "--ffn", help="none (mLSTM-only blocks) or ternary (adds a ternary SwiGLU)."),
    repeats: int = typer.Option(3, "--repeats"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Greedy decoding tokens/s, batch 1: the 2-bit packed model vs the same model as fp32 dense (random weights)."""
    from ternkit.bench import bench_generate
    from ternkit.errors import TernkitError

    _setup(threads, repeats)
    r = bench_generate(d_model, blocks, prompt_tokens, tokens, ffn, heads=heads, repeats=repeats)
    ops = ", ".join(f"{k}: {'compiled' if v['compiled'] else 'twin'}" for k, v in r["ops"].items())
    t = Table(title=f"Decoding, batch 1: {blocks} blocks, d={d_model}, ffn={ffn}, {prompt_tokens}-token prompt, "
                    f"{tokens} new tokens, median of {repeats}",
              caption=_caption(ops))
    for col in ("model", "prefill tok/s", "decode tok/s", "ratio", "goal"):
        t.add_column(col, justify="right")
    t.add_row("fp32 dense", f"{r['prefill_tps']['fp32']:.1f}", f"{r['decode_tps']['fp32']:.1f}", "1.00x", "")
    t.add_row("packed 2-bit", f"{r['prefill_tps']['packed']:.1f}", f"{r['decode_tps']['packed']:.1f}",
              f"{r['ratio']:.2f}x", _goal(r["ratio"], r["goal"]))
    console.print(t)
    div = "none" if r["first_divergence"] is None else f"token {r['first_divergence']}"
    console.print(f"greedy tokens equal: {r['greedy_match']:.0%} (first divergence: {div}); on the same text, "
                  f"argmax agreement {r['forced_match']:.0%}, logits cosine {r['logits_cosine']:.3f} (packed vs the "
                  f"unpacked int8 model: {r['latent_match']:.0%}, {r['latent_cosine']:.3f}); "
                  f"sparse-write skip fraction: {r['skip_fraction']:.2f}")
    _write_json(json_path, r)


def _seeds(values: Optional[List[str]]) -> List[int]:
    """--seeds 1 --seeds 2 or --seeds 1,2 (default: the main recipe's seed, 1234)."""
    from ternkit.errors import TernkitError

    out: List[int] = []
    for v in values or ["1234"]:
        for part in v.split(","):
            try:
                out.append(int(part))
            except ValueError:
                raise TernkitError(f"--seeds {v!r}: seeds are integers, e.g. --seeds 1,2,3.") from None
    return list(dict.fromkeys(out))


@bench_app.command("quality")
@user_errors
def bench_quality_cmd(
    steps: int = typer.Option(300, "--steps", help="Optimizer steps of every variant."),
    seeds: Optional[List[str]] = typer.Option(None, "--seeds", help="Seeds (repeatable or comma-separated); "
                                              "default 1234. Several: mean loss and each seed's."),
    variants: Optional[List[str]] = typer.Option(None, "--variant", help="Variant key (repeatable); default all; "
                                                 "a wrong key lists them. The float twin always runs."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="key=value recipe override applied to every "
                                             "variant (repeatable), e.g. model.n_blocks=8."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Keep the run folders and token cache here "
                                            "(default: a temporary folder, deleted afterwards)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Val loss of ternary variants of the main job's model vs its float twin (same data, seed, steps); the goal:
    the flagship within 1.03x of the float twin."""
    from ternkit.bench import QUALITY_GOAL, bench_quality

    _setup(threads, 1)
    seed_list = _seeds(seeds)
    status = console.status("preparing data and warming up", spinner="dots")

    def on_run(ev: dict) -> None:
        where = f"[{ev['index']}/{ev['total']}] {ev['label']}, seed {ev['seed']}"
        if not ev["done"]:
            status.update(f"training {where} ({steps} steps)")
            return
        mark = " [red]diverged[/]" if ev["diverged"] else ""
        console.print(f"{where}: val loss {ev['val_loss']:.4f} in {ev['seconds']:.1f} s{mark}", highlight=False)

    with status:
        r = bench_quality(steps, seed_list, variants, sets or [], work_dir, on_run=on_run)
    s = r["settings"]
    seed_txt = f"seed {seed_list[0]}" if len(seed_list) == 1 else f"mean of seeds {', '.join(map(str, seed_list))}"
    t = Table(title=f"Quality vs the float twin: {s['n_blocks']} blocks x d_model {s['d_model']}, context "
                    f"{s['context_length']}, batch {s['batch_size']}, {steps} steps, {seed_txt}",
              caption=_caption(f"val loss over {s['val_batches']} fixed batches; ratio and time = variant / twin"))
    t.add_column("key", justify="left")
    t.add_column("variant", justify="left")
    t.add_column("val loss", justify="right")
    if len(seed_list) > 1:
        t.add_column("per seed", justify="right")
    for col in ("ratio", "train s", "time", "diverged"):
        t.add_column(col, justify="right")
    for v in r["variants"]:
        cells = [v["key"], v["label"], f"{v['val_loss']:.4f}"]
        if len(seed_list) > 1:
            cells.append(" ".join(f"{x['val_loss']:.4f}" for x in v["runs"]))
        cells += [f"{v['ratio']:.3f}x", f"{v['seconds']:.1f}", f"{v['time_ratio']:.2f}x",
                  "[red]diverged[/]" if v["diverged"] else "no"]
        t.add_row(*cells)
    console.print(t)
    flag = next((v for v in r["variants"] if v["key"] == "flagship"), None)
    if flag is not None:
        ok = flag["ratio"] <= QUALITY_GOAL and not flag["diverged"]
        console.print(f"flagship val loss {flag['ratio']:.3f}x the float twin's: goal <= {QUALITY_GOAL:g}x "
                      + ("[green]met[/]" if ok else "[red]missed[/]"), highlight=False)
    _write_json(json_path, r)


@bench_app.command("step")
@user_errors
def bench_step_cmd(
    sets: Optional[List[str]] = typer.Option(None, "--set", help="key=value recipe override for both models "
                                             "(repeatable), e.g. model.n_blocks=4."),
    repeats: int = typer.Option(15, "--repeats"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile both models first (trainer.compile)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Training-step time (fwd + bwd + AdamW) of the main job's model vs its float twin, at the main job's size."""
    import torch

    from ternkit.bench import bench_train_step

    _setup(threads, repeats)
    with console.status("building and warming up both models" + (" (compiling: a minute or two)" if compile else ""),
                        spinner="dots"):
        r = bench_train_step(sets or [], repeats, compile)
    s = r["settings"]
    t = Table(title=f"Training step: {s['n_blocks']} blocks x d_model {s['d_model']}, context {s['context_length']}, "
                    f"batch {s['batch_size']}, {torch.get_num_threads()} threads, median of {repeats}"
                    + (", compiled" if compile else ""),
              caption=_caption("ratio = model / twin step time (> 1: slower)"))
    for col in ("model", "ms / step", "ratio", "goal"):
        t.add_column(col, justify="right")
    t.add_row("float twin", f"{r['median_s']['twin'] * 1e3:.1f}", "1.00x", "")
    goal = f"[green]<= {r['goal']:g}x met[/]" if r["met"] else f"[red]<= {r['goal']:g}x missed[/]"
    t.add_row("main job's model", f"{r['median_s']['main'] * 1e3:.1f}", f"{r['ratio']:.2f}x", goal)
    console.print(t)
    if compile:
        console.print("first step (compile): " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
    _write_json(json_path, r)
