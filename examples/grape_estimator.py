"""How good is GrAPE's Jacobian estimate? per-site against shared tangents, activation against
weight perturbations, on a real network and batch.

    python examples/grape_estimator.py [--json bench/results/grape-estimator-cpu.json]

For the MLP 64-256x3-10 (tanh) on a digits batch of 128, the true batch-mean
Jacobian J_l = d y_hat / d h_l of every site is computed with torch.func.jacrev;
then, for each way of estimating it, 50 single-step estimates J_hat_l
(``fastdfa.grape.dual_pass``) are compared with it: the mean cosine
cos(J_hat_l, J_l) of one step (what one alignment step sees) and the relative
error of the 50-step average (how fast the noise averages out).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import fastdfa  # noqa: E402
from fastdfa import grape  # noqa: E402
from fastdfa.info import machine_info  # noqa: E402
from fastdfa.lab.data import load_dataset  # noqa: E402
from fastdfa.models import make_mlp  # noqa: E402

DRAWS = 50


def true_jacobians(model, x):
    """Batch-mean d y / d h_l for the sites at the inputs of layers 2..L of make_mlp's Sequential."""
    linears = [m for m in model if isinstance(m, fastdfa.Linear)]
    hs, h = [], x.flatten(1)
    with torch.no_grad():
        for lin in linears[:-1]:
            h = lin(h)
            hs.append(h)

    def rest(start):
        def f(v):
            for lin in linears[start:]:
                v = lin(v)
            return v
        return f

    with torch.no_grad():
        return [torch.func.vmap(torch.func.jacrev(rest(i + 1)))(h).mean(0) for i, h in enumerate(hs)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = load_dataset("digits")
    x = data.x_train[:128].double()
    model = make_mlp(64, (256, 256, 256), 10, "tanh").double()
    truth = true_jacobians(model, x)
    rows = {}
    for jvp in ("per-site", "shared"):
        for perturb in ("activation", "weight"):
            dfa = fastdfa.DFA(model, mode="grape", jvp=jvp, perturb=perturb, seed=1, example_input=x[:2])
            cos = [[] for _ in truth]
            sums = [torch.zeros_like(j) for j in truth]
            for _ in range(DRAWS):
                est = grape.dual_pass(dfa, (x,), {}, x.shape[0])
                for k, (p, t, j) in enumerate(zip(est.perturbations, est.tangents, truth)):
                    j_hat = t.T @ p / x.shape[0]
                    cos[k].append(float(F.cosine_similarity(j_hat.flatten(), j.flatten(), dim=0)))
                    sums[k] += j_hat
            rows[f"{jvp}/{perturb}"] = {
                "one_step_cosine": [statistics.fmean(c) for c in cos],
                "one_step_cosine_std": [statistics.stdev(c) for c in cos],
                f"relative_error_of_{DRAWS}_step_mean": [float((s / DRAWS - j).norm() / j.norm())
                                                         for s, j in zip(sums, truth)]}
            for model_module in model.modules():  # a fresh wrapper next time: drop this one's hooks
                model_module._forward_pre_hooks.clear()
    bound = [grape.expected_cosine_lower_bound(j) for j in truth]
    print(f"sites: inputs of layers 2, 3, 4 (256 features each); one-draw cosine lower bound per sample: "
          f"{', '.join(f'{b:.3f}' for b in bound)}")
    print(f"{'estimator':<22}{'cos, one step (per site)':>34}{'rel. error, mean of 50':>30}")
    for name, r in rows.items():
        c = "  ".join(f"{v:.3f}" for v in r["one_step_cosine"])
        e = "  ".join(f"{v:.3f}" for v in r[f"relative_error_of_{DRAWS}_step_mean"])
        print(f"{name:<22}{c:>34}{e:>30}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "model": "mlp 64-256x3-10 tanh, float64",
                                         "batch": 128, "draws": DRAWS, "single_sample_bound": bound,
                                         "estimators": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
