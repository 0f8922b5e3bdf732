"""Parity experiment (issue 3): a one-block mLSTM with the ternary forget gate extrapolates parity to length 64."""

from __future__ import annotations

import pytest
import torch

from ternkit.parity import BOS, parity_batch, run_parity


def test_parity_batch_targets() -> None:
    tokens, targets = parity_batch(5, 9, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (5, 10)
    assert torch.all(tokens[:, 0] == BOS) and torch.all(targets[:, 0] == 0)
    assert torch.equal(targets[:, -1], tokens[:, 1:].sum(1) % 2)


@pytest.mark.slow
def test_ternary_gate_learns_parity_sigmoid_does_not() -> None:
    tern = run_parity("ternary", seed=0)
    sig = run_parity("sigmoid", seed=0)
    print(f"parity acc@64: ternary {tern['final_acc']:.3f}, sigmoid {sig['final_acc']:.3f}")
    assert tern["train_final_acc"] >= 0.99
    assert tern["final_acc"] >= 0.99  # trained on length 16, scored on length 64
    assert sig["final_acc"] <= 0.75  # a gate in (0, 1) cannot carry the sign: near chance


@pytest.mark.slow
def test_main_job_gate_keeps_parity_at_16x_the_training_length() -> None:
    """The gate the main job trains with still tracks state: trained at length 16, scored at 256."""
    from ternkit.recipe import load_recipe

    gate = load_recipe("mlstm_stc").model.gate_mode
    runs = [run_parity(gate, seed=s, eval_len=256) for s in range(4)]
    print("parity acc@256 per seed:", [round(r["final_acc"], 3) for r in runs])
    # Measured for ternary_decay: seeds 1 and 2 reach 1.000 at 256; like the pure ternary gate, some
    # seeds never find the solution at all (chance already at the training length).
    assert sum(r["final_acc"] >= 0.99 and r["train_final_acc"] >= 0.99 for r in runs) >= 2
