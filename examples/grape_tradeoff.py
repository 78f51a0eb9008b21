"""GrAPE's per-site against shared tangents (and activation against auto perturbation) in accuracy,
on digits with the small CNN, 5 epochs, seeds 0-2. (Step cost: bench/test_grape_step.py, timed
interleaved on a quiet machine.)

    python examples/grape_tradeoff.py [--json bench/results/grape-tradeoff-digits.json]
"""

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from fastdfa.info import machine_info  # noqa: E402
from fastdfa.lab.data import load_dataset  # noqa: E402
from fastdfa.lab.train import TrainConfig, train  # noqa: E402

VARIANTS = {"dfa": dict(method="dfa"),
            "grape per-site activation": dict(method="grape", jvp="per-site", perturb="activation"),
            "grape shared activation": dict(method="grape", jvp="shared", perturb="activation"),
            "grape per-site auto": dict(method="grape", jvp="per-site", perturb="auto")}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    data = load_dataset("digits")
    base = TrainConfig(model="cnn", epochs=5)
    rows = {}
    for name, kw in VARIANTS.items():
        accs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            r = train(replace(base, seed=seed, **kw), data, log=None)
            accs.append(r.test_accuracy)
        rows[name] = {"test_accuracy": accs, "mean": statistics.fmean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        print(f"{name:<28} acc {rows[name]['mean']:.4f} ± {rows[name]['std']:.4f}   "
              f"({', '.join(f'{a:.4f}' for a in accs)})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "data": "digits", "model": "cnn", "epochs": 5,
                                         "variants": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
