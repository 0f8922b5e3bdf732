"""Parity of bit strings with a one-block mLSTM: ternary forget gate vs sigmoid gate.

Trains on strings of length 16 (running-parity targets at every position, so prefix lengths
1..16) and reports the accuracy on the full-string parity of length-64 strings.

    python benchmarks/parity.py --steps 300 --seed 0 [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from ternkit.parity import run_parity


def main() -> None:
    """Train both gate modes and print (and optionally write) their accuracies."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="run seeds seed .. seed+seeds-1 and report each")
    ap.add_argument("--train-len", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--json", type=str, default=None, help="write the results to this file")
    args = ap.parse_args()
    results = []
    for gate_mode in ("ternary", "sigmoid"):
        for seed in range(args.seed, args.seed + args.seeds):
            r = run_parity(gate_mode, steps=args.steps, seed=seed, train_len=args.train_len, eval_len=args.eval_len,
                           lr=args.lr, d_model=args.d_model, n_heads=args.heads)
            r.pop("model")
            results.append(r)
            print(f"{gate_mode:8s} seed {seed}: acc@{args.train_len} {r['train_final_acc']:.3f}  "
                  f"acc@{args.eval_len} {r['final_acc']:.3f} (all prefixes {r['prefix_acc']:.3f})  "
                  f"loss {r['loss']:.4f}  {r['seconds']:.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
