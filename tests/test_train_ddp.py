"""DDP on CPU: two gloo processes train a toy model and end with identical integer state, STC thresholds and
MoE biases on every rank (checked by the run itself and recorded in summary.json)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from conftest import run_cli_subprocess, sets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_replica_digests_see_integer_tau_and_bias_changes() -> None:
    """The consistency check hashes exactly the state ternkit keeps in sync: a one-unit change is caught."""
    from ternkit.models.config import XLSTMLMConfig
    from ternkit.models.lm import XLSTMLM
    from ternkit.train.callbacks import replica_digests

    torch.manual_seed(0)
    cfg = XLSTMLMConfig(vocab_size=16, d_model=32, n_blocks=1, n_heads=2, context_length=16,
                        memory_backend="stc_sparse", ternary_projections=["up", "qkv", "down", "ffn"],
                        quant={"scale": "group"}, tie_embeddings=False,
                        ffn="moe", moe={"experts": 4, "top_k": 2, "hidden": 8, "balancing": "aux_free"})
    model = XLSTMLM(cfg)
    names, ref = replica_digests(model)
    assert any(n.endswith(".corr_accum") for n in names) and any(n.endswith(".tau") for n in names)
    assert any(n.endswith("expert_bias") for n in names)
    assert not any("embedding" in n for n in names)  # float parameters are DDP's business
    for suffix in (".corr_accum", ".tau", "expert_bias"):
        name = next(n for n in names if n.endswith(suffix))
        buf = dict(model.named_buffers())[name]
        with torch.no_grad():
            buf.view(-1)[0] += 1
        _, now = replica_digests(model)
        assert (now != ref).sum() == 1 and now[names.index(name)] != ref[names.index(name)], name
        with torch.no_grad():
            buf.view(-1)[0] -= 1
        assert torch.equal(replica_digests(model)[1], ref)


_DDP = {
    # STC thresholds + integer-state (group scale) layers on the parity task: no tokenizer, seconds.
    "parity_group": ["parity"] + sets(
        "quant.scale=group", "model.d_model=32", "model.n_heads=2", "model.n_blocks=1",
        "model.ternary_projections=[up,qkv,down]", "data.parity.train_len_min=4", "data.parity.train_len_max=8", "data.parity.eval_len=16", "data.parity.num_val=8"),
    # Ternary MoE with DeepSeek-style bias balancing: expert biases must move identically on both ranks.
    "moe_aux_free": ["moe_ternary"] + sets(
        "model.n_blocks=1", "model.d_model=32", "model.context_length=32", "data.max_chars=60000",
        "model.moe.experts=4", "model.moe.top_k=1", "model.moe.hidden=16", "model.moe.balancing=aux_free",
        "model.moe.bias_update_rate=0.01", "trainer.sample_tokens=4"),
}


@pytest.mark.parametrize("case", ["parity_group", pytest.param("moe_aux_free", marks=pytest.mark.slow)])
def test_ddp_two_cpu_processes_keep_integer_state_identical(case: str, tmp_path: Path) -> None:
    argv = ["train"] + _DDP[case] + ["--no-progress"] + sets(
        "name=ddp", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.batch_size=4",
        "trainer.max_steps=4", "trainer.val_every=4", "trainer.val_batches=1", "trainer.log_every=1",
        "schedule.warmup_steps=1", "logging.tensorboard=false", "checkpoint.every_steps=0")
    res = run_cli_subprocess(argv, cwd=tmp_path, timeout=300,
                             env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["replicas"] == 2
    assert summary["replicas_identical"] is True
    assert summary["steps"] == 4
    assert res.stdout.count("steps: 4") == 1  # one summary panel, from rank 0
    sd = torch.load(tmp_path / "runs" / "ddp" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    if case == "parity_group":
        steps = [int(v) for k, v in sd.items() if k.endswith(".step") and v.dtype == torch.int64]
        assert steps and set(steps) == {4}  # one integer update per optimizer step, not one per rank
    else:
        bias = [v for k, v in sd.items() if k.endswith("expert_bias")]
        assert bias and any(bool(b.abs().sum() > 0) for b in bias)  # the biases did move
    assert "DIFFERENT" not in res.stderr and "Traceback" not in res.stderr


_NO_TAU_SYNC = """
from ternkit.modules.stc import STCQuantizer

STCQuantizer.sync_ = lambda self: None  # ranks see different data, so their thresholds now drift apart
from ternkit.cli.main import main

main()
"""


@pytest.mark.slow
def test_ddp_replica_check_reports_diverged_thresholds(tmp_path: Path) -> None:
    """With the STC threshold sync switched off, the end-of-run check must notice and say so."""
    script = tmp_path / "no_tau_sync.py"
    script.write_text(_NO_TAU_SYNC)
    argv = ["train", "parity", "--no-progress"] + sets(
        "name=ddp", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu",
        "model.d_model=32", "model.n_heads=2", "model.n_blocks=1", "model.memory_backend=stc_sparse",
        "data.parity.train_len_min=4", "data.parity.train_len_max=8", "data.parity.eval_len=16", "data.parity.num_val=8", "trainer.batch_size=4", "trainer.max_steps=2",
        "trainer.val_every=2", "trainer.val_batches=1", "schedule.warmup_steps=1", "logging.tensorboard=false",
        "checkpoint.every_steps=0")
    res = run_cli_subprocess(argv, cwd=tmp_path, timeout=300, script=str(script),
                             env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["replicas_identical"] is False
    assert "DIFFERENT" in res.stderr and ".tau" in res.stderr
