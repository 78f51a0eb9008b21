"""The GPT-2-shaped LM table from the runs of examples/lm_gpt2_grid.sh, its summary record and its plot.

    python examples/lm_gpt2_table.py bench/results/lm-gpt2 --steps bench/results/lm-gpt2-step-cpu.json \\
        [--json bench/results/lm-gpt2-ppl-cpu.json] [--plot docs/lm-gpt2-ppl.png]

Rows: BP and each DFA variant (where the error is taken x its rank x where the sites are). Columns: the
whole step's time over BP's and its FLOP floor (from the interleaved step bench, ``--steps``), test
perplexity per token on Persuasion (mean, std over seeds), bits per character. The plot: test
perplexity against wall time, where a run's wall time after ``s`` steps is ``s`` x its variant's
median step time in the interleaved bench (the runs themselves share the 2 cores with each other, so
their own clocks are not comparable; the bench's are, measured side by side).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

from lm_austen_table import group_runs  # examples/: one way to read a folder of runs

GROUP = "lm-gpt2-4x256-v16384-t128-b8"  # bench/test_lm_gpt2_step.py's group


def bench_name(variant: str) -> str:
    """The grid's variant name (sites "layers", the train flag) as the step bench names it ("linear")."""
    return "bp" if variant == "bp" else variant.replace("-layers", "-linear")


def rows(folder: str) -> dict:
    """The runs grouped by variant (the file name less its seed), with each run's perplexity curve."""
    def curve(run):
        return [(e["step"], e["tokens"], math.exp(e["test_loss"])) for e in run.get("evals", [])]
    return group_runs(folder, lambda run, path: os.path.basename(path).rsplit("-s", 1)[0], {"curves": curve})


def step_times(path: str) -> tuple[dict, dict]:
    record = json.load(open(path))
    times = {k: v["median_ms"] for k, v in record["interleaved"][GROUP].items()}
    return times, record.get("flop_floors", {}).get(GROUP, {})


def plot(groups: dict, times: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    order = sorted(groups, key=lambda v: (v != "bp", groups[v]["mean"]))
    for variant in order:
        ms = times.get(bench_name(variant))
        if ms is None:
            continue
        g = groups[variant]
        steps = [s for s, _, _ in g["curves"][0]]
        # the mean over seeds at each evaluation (every seed evaluates at the same steps)
        ppl = [statistics.mean(c[i][2] for c in g["curves"]) for i in range(len(steps))]
        label = f"{variant} ({len(g['seeds'])} seed{'s' if len(g['seeds']) > 1 else ''})"
        ax.plot([s * ms / 1e3 / 60 for s in steps], ppl, marker="o", markersize=3,
                color="black" if variant == "bp" else None, linewidth=2 if variant == "bp" else 1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("wall time (min): steps x the variant's median step (CPU, 2 threads)")
    ax.set_ylabel("test perplexity per token (Persuasion)")
    ax.set_title("GPT-2 4x256, vocabulary 16,384, context 128, batch 8: one pass over 836,659 tokens", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    from fastdfa.plots import save_figure
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--steps", required=True, help="the step bench's record (bench/test_lm_gpt2_step.py)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    groups = rows(args.folder)
    if not groups:
        print(f"no runs in {args.folder}", file=sys.stderr)
        return 1
    times, floors = step_times(args.steps)
    bp_ms = times["bp"]
    print("| variant | step / BP | FLOP floor | test perplexity | bits/char | seeds |")
    print("|---|---|---|---|---|---|")
    for variant in sorted(groups, key=lambda v: (v != "bp", groups[v]["mean"])):
        g = groups[variant]
        std = f" ± {g['std']:.1f}" if g["std"] is not None else ""
        ms = times.get(bench_name(variant))
        ratio = "-" if ms is None else f"{ms / bp_ms:.2f}"
        floor = floors.get(bench_name(variant))
        g["step_over_bp"] = None if ms is None else ms / bp_ms
        g["flop_floor"] = floor
        print(f"| {variant} | {ratio} | {'-' if floor is None else f'{floor:.2f}'} | {g['mean']:.1f}{std} | "
              f"{statistics.mean(g['bits_per_character']):.3f} | {len(g['seeds'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": os.path.relpath(args.folder), "steps": os.path.relpath(args.steps),
                       "bp_step_ms": bp_ms, "variants": groups}, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(groups, times, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
