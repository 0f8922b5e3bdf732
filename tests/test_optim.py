"""Muon + AdamW optimizer wrapper: who gets which optimizer, both step, state round-trips."""

from __future__ import annotations

import copy

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
