"""FWM's reconstruction error on all-MiniLM-L6-v2 in each error space (no training): per matched layer
||W - G_out G_in^T|| / ||W|| after feedback-weight matching, for the class error (2 classes), the head's input
(``head="classifier"``, 384 wide), and ``error_rank`` 64 / 384 on the head's input, with the greedy
(``lstsq``) and the joint (``joint``) solve.

    python -m fastdfa data minilm
    python examples/fwm_reconstruction.py --json bench/results/fwm-reconstruction-minilm.json
"""

import argparse
import json
import statistics

import torch

import fastdfa
from fastdfa.init import feedback_weight_matching
from fastdfa.lab.data import minilm_dir, record_path
from fastdfa.lab.finetune_hf import load_classifier

SPACES = {  # name: prepare's options
    "class error (2)": {},
    "head input (384)": {"head": "classifier"},
    "head input, error_rank 64": {"head": "classifier", "error_rank": 64},
    "head input, error_rank 384": {"head": "classifier", "error_rank": 384},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lstsq,joint")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model_dir = minilm_dir()
    rows = []
    for space, options in SPACES.items():
        for method in args.methods.split(","):
            dfa = fastdfa.prepare(load_classifier(model_dir, 2, 0), mode="dfa", seed=0, feedback_layout="per-feature",
                                  **options)
            dfa.build((torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0)),))
            report = feedback_weight_matching(dfa, method=method)
            matched = [r for r in report if r.action == "weights matched"]
            errors = [r.reconstruction_error for r in matched]
            top = next(r for r in report if r.action == "feedback = weight^T")
            largest = max(float(s.feedback.abs().max()) for s in dfa.sites)
            row = {"space": space, "method": method, "options": options, "matched": len(matched),
                   "mean_error": statistics.fmean(errors), "max_error": max(errors),
                   "below_half": sum(e < 0.5 for e in errors), "output_layer": top.layer,
                   "output_error": top.reconstruction_error, "max_abs_feedback": largest,
                   "min_wa_after": min(r.wa_after for r in report if r.wa_after is not None),
                   "layers": {r.layer: r.reconstruction_error for r in matched}}
            rows.append(row)
            print(f"{space:<28} {method:<6} mean {row['mean_error']:.3f}  max {row['max_error']:.3f}  "
                  f"< 0.5: {row['below_half']}/{len(matched)}  output layer {top.layer} {top.reconstruction_error:.3f}"
                  f"  max |F| {largest:.3g}  min WA after {row['min_wa_after']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": record_path(model_dir), "torch": torch.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
