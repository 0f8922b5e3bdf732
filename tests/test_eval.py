"""``ternkit eval``: loss, perplexity and bits per byte on text files or the run's own validation split."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_sentence_error, chdir, read_metrics, sets, snapshot

TEXT = "def f(x):\n    return x * 2  # héllo wörld, ünïcode ✓\n" * 12


def _val_loss_at(run_dir: Path, global_step: int) -> float:
    """The val/loss metrics.csv logged at ``global_step`` (Lightning logs it on the row of step global_step - 1)."""
    rows = [r for r in read_metrics(run_dir) if r.get("val/loss") and int(r["step"]) == global_step - 1]
    assert rows, f"no val/loss row for step {global_step}"
    return float(rows[-1]["val/loss"])


def _manual_nats(model: torch.nn.Module, ids: list[int], context: int) -> tuple[float, int]:
    """(sum of nats, tokens) of ``ids`` scored one window at a time: window j predicts ids[s+1:s+T+1] from ids[s:s+T]."""
    nats, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, context):
            x = torch.tensor([ids[s : s + context]])
            y = torch.tensor(ids[s + 1 : s + context + 1])
            x = x[:, : len(y)]
            nats += float(F.cross_entropy(model(x)[0].float(), y, reduction="sum"))
            n += len(y)
    return nats, n


def test_eval_checkpoint_equals_training_val_loss(cli, toy_run: Path, tmp_path: Path) -> None:
    # last.ckpt: the last val/loss row and summary.json; best.ckpt: the val/loss of the step it was saved at.
    summary = json.loads((toy_run / "summary.json").read_text())
    last_val = [float(r["val/loss"]) for r in read_metrics(toy_run) if r.get("val/loss")][-1]
    assert last_val == pytest.approx(summary["val_loss"], rel=1e-7)
    out = tmp_path / "last.json"
    res = cli(["eval", str(toy_run / "last.ckpt"), "--json", str(out)])
    assert res.code == 0, res.text
    assert res.err == ""  # not a terminal: no progress bar, nothing extra
    got = json.loads(out.read_text())
    assert got["loss"] == pytest.approx(last_val, rel=1e-5)
    # 2 val batches x 4 windows x 32 tokens, one byte each; the row the table printed is the same number.
    assert got["tokens"] == got["bytes"] == 2 * 4 * 32 and got["batches"] == 2 and got["capped"] is False
    assert got["bits_per_byte"] == pytest.approx(got["loss"] / math.log(2), rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    assert got["kind"] == "checkpoint" and got["global_step"] == 12 and got["data"] == f"validation split of {toy_run}"
    assert f"{got['loss']:.4f}" in res.out and "bits/byte" in res.out and f"wrote {out}" in res.out

    best_step = int(torch.load(toy_run / "best.ckpt", map_location="cpu", weights_only=True)["global_step"])
    res = cli(["eval", str(toy_run / "best.ckpt"), "--json", "-"])
    assert res.code == 0, res.text
    best = json.loads(res.out)
    assert best["loss"] == pytest.approx(_val_loss_at(toy_run, best_step), rel=1e-5)

    # --max-tokens on the validation split: the first batches in order, the last one cut, said so.
    for cap, batches in ((128, 1), (40, 2)):  # 128 = the first batch (4 windows of 32); 40 = one window and 8 tokens
        res = cli(["eval", str(toy_run / "last.ckpt"), "--max-tokens", str(cap), "--json", "-"])
        c = json.loads(res.out)
        assert (c["tokens"], c["bytes"], c["batches"], c["capped"]) == (cap, cap, batches, True), res.text

    # A copy of the run folder elsewhere, evaluated from another working directory: the same numbers.
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(toy_run, copy)
    with chdir(tmp_path):
        res = cli(["eval", str(copy / "last.ckpt"), "--json", "-"])
    assert res.code == 0, res.text
    assert json.loads(res.out)["loss"] == pytest.approx(got["loss"], rel=1e-12)


def test_eval_data_files_windows_tokens_bytes_and_cap(cli, toy_run: Path, tmp_path: Path) -> None:
    from ternkit.export import load_model

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT, encoding="utf-8")
    b.write_text("x = [1, 2, 3]\n", encoding="utf-8")
    ckpt = toy_run / "last.ckpt"
    res = cli(["eval", str(ckpt), "--data", str(a), "--data", str(b), "--json", "-"])
    assert res.code == 0, res.text
    got = json.loads(res.out)
    model, _ = load_model(ckpt)
    ids = [list(p.read_bytes()) for p in (a, b)]  # the byte tokenizer: id = byte
    nats = [_manual_nats(model, i, 32) for i in ids]
    total = sum(n for _, n in nats)
    # Every token after each file's first is scored once, and each is one byte of the text.
    assert got["tokens"] == got["bytes"] == total == len(TEXT.encode()) - 1 + 13
    assert got["loss"] == pytest.approx(sum(x for x, _ in nats) / total, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(got["loss"] / math.log(2), rel=1e-12)
    assert got["data"] == [str(a), str(b)] and got["capped"] is False

    # Windows per forward change the batching, not the numbers.
    one = json.loads(cli(["eval", str(ckpt), "--data", str(a), "--data", str(b), "--batch-size", "1",
                          "--json", "-"]).out)
    assert one["loss"] == pytest.approx(got["loss"], rel=1e-5) and one["batches"] > got["batches"]

    # --max-tokens 50: the first 50 targets of a.txt (one full window and 18 tokens of the next), said so.
    res = cli(["eval", str(ckpt), "--data", str(a), "--max-tokens", "50"])
    assert res.code == 0, res.text
    assert "--max-tokens 50 cut the text" in res.out and "capped by --max-tokens" in res.out
    capped = json.loads(cli(["eval", str(ckpt), "--data", str(a), "--max-tokens", "50", "--json", "-"]).out)
    x_nats, n = _manual_nats(model, ids[0][:51], 32)
    assert capped["tokens"] == capped["bytes"] == n == 50 and capped["capped"] is True
    assert capped["loss"] == pytest.approx(x_nats / 50, rel=1e-5)
    # A cap above the text's size cuts nothing.
    big = json.loads(cli(["eval", str(ckpt), "--data", str(b), "--max-tokens", "1000", "--json", "-"]).out)
    assert big["tokens"] == 13 and big["capped"] is False


def test_eval_export_runs_packed_layers_and_needs_data(cli, toy_run: Path, tmp_path: Path) -> None:
    ckpt, exp = toy_run / "last.ckpt", tmp_path / "export"
    assert cli(["export", str(ckpt), "--packed", "-o", str(exp)]).code == 0
    data = tmp_path / "a.txt"
    data.write_text(TEXT, encoding="utf-8")
    a = json.loads(cli(["eval", str(ckpt), "--data", str(data), "--json", "-"]).out)
    b = json.loads(cli(["eval", str(exp), "--data", str(data), "--json", "-"]).out)
    assert b["kind"] == "export" and b["tokens"] == a["tokens"]
    # Packed kernels sum in another order than the float layers: the same loss to fp32 rounding.
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    before = snapshot(sorted(exp.iterdir()))
    msg = assert_one_sentence_error(cli(["eval", str(exp)]))
    assert "is an export folder" in msg and "pass --data FILE" in msg
    assert snapshot(list(before)) == before


def test_eval_progress_callback_counts_batches(toy_run: Path, tmp_path: Path) -> None:
    from ternkit.eval import evaluate

    data = tmp_path / "a.txt"
    data.write_text(TEXT, encoding="utf-8")
    calls: list[tuple[int, int]] = []
    out = evaluate(toy_run / "last.ckpt", [data], batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(k, out["batches"]) for k in range(1, out["batches"] + 1)]
    # Full windows of 32 targets, 4 per forward, and the shorter last window in a batch of its own.
    full, tail = divmod(len(TEXT.encode()) - 1, 32)
    assert tail and out["batches"] == math.ceil(full / 4) + 1


def test_eval_bpe_bytes_are_the_decoded_scored_text(tmp_path: Path) -> None:
    from ternkit.eval import _file_batches
    from ternkit.tokenizer import train_bpe

    tok = train_bpe([TEXT * 4], vocab_size=300, min_frequency=2)
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges: tokens are not bytes
    makers, nbytes, capped = _file_batches([ids], tok, 8, 3, None)
    first = len(tok.decode(ids[:1]).encode())
    assert nbytes == len(TEXT.encode()) - first and capped is False
    # Validation windows hold end-of-document tokens: each counts one byte, as the byte tokenizer's NUL does.
    from ternkit.eval import _text_bytes

    row = tok.encode("ab") + [tok.eos_id] + tok.encode("cd")
    assert _text_bytes(tok, row, separator_is_one_byte=True) == 5
    assert _text_bytes(tok, row) == 4 + len("<|endoftext|>")
    # Every target after the first token exactly once, windows in order.
    targets = [t for make in makers for row in make()[1].tolist() for t in row]
    assert sorted(targets) == sorted(ids[1:]) and len(targets) == len(ids) - 1


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step parity run: a synthetic-task model, without a tokenizer."""
    from ternkit.cli.app import exit_code_of

    importlib.import_module("ternkit.cli.main")  # registers the verbs

    base = tmp_path_factory.mktemp("parity")
    run = base / "runs" / "par"
    argv = ["train", "parity", "--no-progress"] + sets(
        "name=par", f"checkpoint.dir={run}", "trainer.max_steps=1", "trainer.batch_size=4", "trainer.val_batches=1",
        "trainer.val_every=1", "data.parity.num_val=4", "logging.tensorboard=false", "trainer.accelerator=cpu",
        "trainer.devices=1")
    with chdir(base):
        assert exit_code_of(argv) == 0
    return run


def test_eval_bad_inputs_one_sentence_exit_2_nothing_written(cli, toy_run: Path, tmp_path: Path,
                                                             parity_run: Path) -> None:
    ckpt = toy_run / "last.ckpt"
    good = tmp_path / "good.txt"
    good.write_text(TEXT, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    old_json = tmp_path / "old.json"
    old_json.write_text('{"old": true}\n')
    # A checkpoint whose run folder is gone: alone in a folder, its run_info naming a folder that no longer exists.
    alone = tmp_path / "alone"
    alone.mkdir()
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    c["ternkit"]["run_info"]["run_dir"] = str(tmp_path / "gone")
    torch.save(c, alone / "last.ckpt")
    shutil.copyfile(toy_run / "tokenizer.json", alone / "tokenizer.json")

    watched = [p for p in tmp_path.rglob("*") if p.is_file()] + [p for p in toy_run.rglob("*") if p.is_file()]
    watched += [p for p in parity_run.rglob("*") if p.is_file()]
    before = snapshot(watched)
    j = ["--json", str(old_json)]
    cases = [
        (["eval", str(tmp_path / "missing.ckpt")] + j, "does not exist"),
        (["eval", str(junk)] + j, "could not be read as a checkpoint"),
        (["eval", str(ckpt), "--data", str(tmp_path / "nope.txt")] + j, "cannot read --data file"),
        (["eval", str(ckpt), "--data", str(latin1)] + j, "is not UTF-8 text (byte 3, 0xe9"),
        (["eval", str(ckpt), "--data", str(good), "--data", str(empty)] + j, "is empty; pass a text file"),
        (["eval", str(ckpt), "--data", str(short)] + j, "encodes to 1 token, but scoring needs at least 2"),
        (["eval", str(ckpt), "--data", str(good), "--batch-size", "0"] + j, "--batch-size must be at least 1"),
        (["eval", str(ckpt), "--max-tokens", "0"] + j, "--max-tokens must be at least 1"),
        (["eval", str(ckpt), "--json", str(tmp_path / "no" / "such" / "out.json")], "does not exist; create it"),
        (["eval", str(ckpt), "--json", str(tmp_path)], "is a folder; pass the path of a file"),
        (["eval", str(parity_run / "last.ckpt")] + j, "synthetic-task models have none"),
        (["eval", str(alone / "last.ckpt")] + j, "no recipe.yaml found"),
    ]
    for argv, fragment in cases:
        msg = assert_one_sentence_error(cli(argv))
        assert fragment in msg, (argv, msg)
    assert "pass --data FILE" in assert_one_sentence_error(cli(["eval", str(alone / "last.ckpt")]))
    assert snapshot(watched) == before
    assert not (tmp_path / "no").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]
    # With --data the run folder is not needed.
    res = cli(["eval", str(alone / "last.ckpt"), "--data", str(good)])
    assert res.code == 0, res.text
