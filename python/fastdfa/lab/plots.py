"""Plots of lab runs: WA / GA over the epochs of ``train --log-alignment`` runs, or over the steps of
``finetune --model minilm --log-alignment --align-every-steps N`` runs (their means over the layers)."""

from __future__ import annotations

from pathlib import Path

from ..metrics import alignment_summary
from ..plots import plot_alignment_records, save_figure


def plot_alignment(runs: dict[str, dict], path: str | Path) -> Path:
    """WA and GA per layer over the epochs of training runs: label -> ``TrainResult.to_json()`` recorded
    with log_alignment (epoch 0 is before the first step); runs recorded every N steps are drawn over the
    steps instead (``plot_alignment_over_steps``)."""
    if any(run.get("alignment_steps") for run in runs.values()):
        return plot_alignment_over_steps(runs, path)
    series = {}
    for label, run in runs.items():
        if run.get("initial_alignment") is None:
            continue
        series[label] = [(0, run["initial_alignment"])] + [(e["epoch"], e["alignment"]) for e in run["epochs"]]
    return plot_alignment_records(series, path)


def plot_alignment_over_steps(runs: dict[str, dict], path: str | Path) -> Path:
    """Mean WA and mean GA over the layers against the step, one line per run (label -> ``to_json()``
    with ``alignment_steps``): a model with dozens of layers (MiniLM: 38) in two readable panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    drawn = 0
    for label, run in runs.items():
        points = run.get("alignment_steps") or []
        if not points:
            continue
        drawn += 1
        steps = [p["step"] for p in points]
        for ax, kind in zip(axes, ("weight", "gradient")):
            ax.plot(steps, [alignment_summary(p[kind]) for p in points], marker="o", markersize=3, label=label)
    if not drawn:
        raise ValueError("no per-step alignment records to plot: fine-tune with --log-alignment --align-every-steps N")
    for ax, title in zip(axes, ("weight alignment (mean over layers)", "gradient alignment (mean over layers)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(-0.1, 1.05)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
