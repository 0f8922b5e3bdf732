"""Training-step time of the main job's model against its float twin, at the main job's size.

Interleaved fwd + bwd + AdamW steps on the same random batch, median of the repeats:

    python benchmarks/step_time.py [--threads 1] [--repeats 15] [--set model.n_blocks=4 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ternkit.models.lm import XLSTMLM
from ternkit.recipe import load_recipe

TWIN = ["model.gate_mode=sigmoid", "model.memory_backend=dense", "model.ternary_projections=[]"]


def main() -> None:
    """Print the median step time of each model and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="recipe override for both models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for name, sets in (("twin", TWIN), ("main", [])):
        r = load_recipe("mlstm_stc", sets + args.sets)
        torch.manual_seed(0)
        m = XLSTMLM(r.model.with_vocab(256)).train()
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3))
    x = torch.randint(0, 256, (r.trainer.batch_size, r.model.context_length + 1))

    def step(name: str) -> None:
        m, opt = models[name]
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        for n in models:
            step(n)
    times: dict[str, list[float]] = {n: [] for n in models}
    for rep in range(args.repeats):
        for n in (list(models) if rep % 2 == 0 else list(models)[::-1]):
            t0 = time.perf_counter()
            step(n)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"twin {med['twin'] * 1e3:.1f} ms, main job's model {med['main'] * 1e3:.1f} ms per step: "
          f"{med['main'] / med['twin']:.2f}x ({args.threads} threads, median of {args.repeats})")


if __name__ == "__main__":
    main()
