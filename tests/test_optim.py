"""Muon + AdamW optimizer wrapper: who gets which optimizer, both step, state round-trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ternkit.train.optim import MuonWithAdamW, build_optimizer


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.hidden = nn.Linear(8, 8, bias=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.hidden(self.emb(x)))))


def _loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(m(x), (x + 1) % 16)


def test_muon_takes_hidden_matrices_only() -> None:
    m = _Tiny()
    opt = build_optimizer(m, "muon", lr=0.02, weight_decay=0.1)
    assert isinstance(opt, MuonWithAdamW)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(m.hidden.weight)}
    assert adam_ids == {id(p) for p in m.parameters()} - muon_ids
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)


def test_muon_trains_and_state_round_trips() -> None:
    torch.manual_seed(0)
    m = _Tiny()
    opt = build_optimizer(m, "muon", lr=0.02, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.randint(0, 16, (64,))
    first = _loss(m, x).item()
    for _ in range(30):
        opt.zero_grad()
        _loss(m, x).backward()
        opt.step()
        sched.step()
    assert _loss(m, x).item() < 0.5 * first
    # A copy restored from the state dicts takes exactly the same next step.
    m2 = copy.deepcopy(m)
    opt2 = build_optimizer(m2, "muon", lr=0.02, weight_decay=0.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for model, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        _loss(model, x).backward()
        o.step()
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_ternary_latent_weights_get_their_own_lr_and_weight_decay() -> None:
    from ternkit.modules.linear import TernaryLinear

    m = _Tiny()
    m.hidden = TernaryLinear(8, 8, bias=True, scale="per_row")
    opt = build_optimizer(m, "adamw", 1e-3, 0.1, ternary_lr_scale=2.0, ternary_weight_decay=0.0)
    tern = [g for g in opt.param_groups if "lr_scale" in g]
    assert len(tern) == 1 and len(tern[0]["params"]) == 1 and tern[0]["params"][0] is m.hidden.weight
    assert tern[0]["lr"] == 2e-3 and tern[0]["weight_decay"] == 0.0 and tern[0]["base_wd"] == 0.0
    others = [p for g in opt.param_groups if "lr_scale" not in g for p in g["params"]]
    assert any(p is m.hidden.bias for p in others) and any(p is m.head.weight for p in others)
    assert all(g["lr"] == 1e-3 for g in opt.param_groups if "lr_scale" not in g)
    # Default settings keep the two classic groups: the same optimizer as before the option existed.
    assert all("lr_scale" not in g for g in build_optimizer(m, "adamw", 1e-3, 0.1).param_groups)


def test_resume_applies_the_recipes_new_lr_and_records_it(cli, monkeypatch, tmp_path, token_cache) -> None:
    import json

    from conftest import read_metrics, sets, toy_train_argv

    monkeypatch.chdir(tmp_path)
    base = toy_train_argv(token_cache, 4, "name=lr", "optimizer.lr=1e-2", "optimizer.two_stage=false",
                          "schedule.kind=constant", "schedule.warmup_steps=0")
    assert cli(base).code == 0
    res = cli(base + sets("trainer.max_steps=8", "optimizer.lr=2e-3") + ["--resume", "auto"])
    assert res.code == 0, res.text
    assert "with changed settings" in res.err and "optimizer.lr 0.01 -> 0.002" in res.err
    run = tmp_path / "runs" / "lr"
    lrs = {int(r["step"]): float(r["lr"]) for r in read_metrics(run) if r.get("lr")}
    # Extending a finished run continues the step labels where they stopped (no gap, no repeat).
    assert sorted(int(r["step"]) for r in read_metrics(run) if r.get("train/loss")) == list(range(8))
    assert [lrs[s] for s in range(4)] == pytest.approx([1e-2] * 4) and [lrs[s] for s in range(4, 8)] == pytest.approx([2e-3] * 4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["changed_on_resume"]["optimizer.lr"] == [0.01, 0.002]
    assert summary["changed_on_resume"]["trainer.max_steps"] == [4, 8]
    (entry,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert entry["step"] == 4 and entry["changed"]["optimizer.lr"] == [0.01, 0.002]


def test_ternary_lr_max_caps_the_latent_weights_peak_lr() -> None:
    from ternkit.modules.linear import TernaryLinear

    m = _Tiny()
    m.hidden = TernaryLinear(8, 8, bias=True, scale="per_row")
    for lr, want in ((3e-3, 2e-3), (1e-3, 1e-3)):
        opt = build_optimizer(m, "adamw", lr, 0.1, ternary_lr_max=2e-3)
        (tern,) = [g for g in opt.param_groups if "lr_scale" in g]  # a group of its own even when uncapped
        assert tern["lr"] == pytest.approx(want) and tern["params"][0] is m.hidden.weight
        assert all(g["lr"] == lr for g in opt.param_groups if "lr_scale" not in g)
