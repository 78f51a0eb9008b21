"""Alignment over training as a PNG: "align, then memorise" (Refinetti et al.)."""

from __future__ import annotations

from pathlib import Path


def plot_alignment(runs: dict[str, dict], path: str | Path) -> Path:
    """One row per run (label -> ``TrainResult.to_json()`` recorded with log_alignment), two panels:
    weight alignment and gradient alignment per layer against the epoch (0 = before training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in runs.items() if v.get("initial_alignment") is not None}
    if not runs:
        raise ValueError("no run has alignment records: train fa or dfa with --log-alignment")
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for row, (label, run) in enumerate(runs.items()):
        records = [run["initial_alignment"]] + [e["alignment"] for e in run["epochs"]]
        for col, (kind, title) in enumerate((("weight", "weight alignment (WA)"),
                                             ("gradient", "gradient alignment (GA)"))):
            ax = axes[row][col]
            layers = list(records[0][kind])
            for layer in layers:
                ax.plot(range(len(records)), [r[kind].get(layer, float("nan")) for r in records],
                        marker="o", markersize=3, label=f"layer {layer}")
            ax.set_title(f"{label}: {title}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylim(-0.1, 1.05)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
