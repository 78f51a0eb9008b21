"""Plots of lab runs: WA / GA over the epochs of ``train --log-alignment`` runs."""

from __future__ import annotations

from pathlib import Path

from ..plots import plot_alignment_records


def plot_alignment(runs: dict[str, dict], path: str | Path) -> Path:
    """WA and GA per layer over the epochs of training runs: label -> ``TrainResult.to_json()`` recorded
    with log_alignment (epoch 0 is before the first step)."""
    series = {}
    for label, run in runs.items():
        if run.get("initial_alignment") is None:
            continue
        series[label] = [(0, run["initial_alignment"])] + [(e["epoch"], e["alignment"]) for e in run["epochs"]]
    return plot_alignment_records(series, path)
