"""Integer updates under torch.distributed: 2 gloo processes on CPU agree with each other and with one process."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ternkit.modules.group import GroupTernaryLinear, TernaryRMSNorm, apply_integer_updates

WORLD = 2
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)  # identical init on every rank
    return nn.Sequential(GroupTernaryLinear(16, 12, group_size=4, vote_threshold=2),
                         TernaryRMSNorm(12, group_size=4, vote_threshold=2),
                         GroupTernaryLinear(12, 4, group_size=8, vote_threshold=2))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)  # different data per rank
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _update(model: nn.Module, step: int) -> None:
    # alternate the bucketed helper and the per-layer method: both must reduce the same way
    if step % 2 == 0:
        assert apply_integer_updates(model) == 3
    else:
        for m in model:
            m.apply_update()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        for step in range(STEPS):
            x, y = _batch(step, rank)
            F.mse_loss(model(x), y).backward()
            if step == 2 and rank == 1:
                # a second micro-batch on one rank only: accumulation and reduction compose
                x2, y2 = _batch(step, 7)
                F.mse_loss(model(x2), y2).backward()
            _update(model, step)
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_integer_updates_match_across_ranks_and_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # single process: each rank's batch as a micro-batch, sign sums accumulate, one update per step
    ref = _model()
    for step in range(STEPS):
        for rank in range(WORLD):
            x, y = _batch(step, rank)
            F.mse_loss(ref(x), y).backward()
        if step == 2:
            x2, y2 = _batch(step, 7)
            F.mse_loss(ref(x2), y2).backward()
        _update(ref, step)
    expect = ref.state_dict()
    init = _model().state_dict()

    assert set(states[0]) == set(expect)
    for k, v in expect.items():
        assert v.dtype in {torch.uint8, torch.int8, torch.int16, torch.int64}, k
        assert torch.equal(states[0][k], states[1][k]), f"{k} differs across ranks"
        assert torch.equal(states[0][k], v), f"{k} differs from the single-process run"
    assert int(expect["0.step"]) == STEPS and int(expect["1.step"]) == STEPS
    # the run really moved the state: trits flipped and correlations accumulated
    assert not torch.equal(expect["0.packed_trits"], init["0.packed_trits"])
    assert int(expect["2.corr_accum"].abs().sum()) + int((expect["2.exponent"] != init["2.exponent"]).sum()) > 0
