"""Alignment over training as a PNG: "align, then memorise" (Refinetti et al.): the library's plots
(``AlignmentLog.plot``); the lab's run plots are in ``fastdfa.lab.plots``."""

from __future__ import annotations

from pathlib import Path

Record = dict  # {"weight": {layer: WA}, "gradient": {layer: GA}}


def plot_alignment_records(series: dict[str, list[tuple[float, Record]]], path: str | Path,
                           xlabel: str = "epoch") -> Path:
    """One row per label, two panels (WA and GA per layer) against x; ``series[label]`` is a list of
    ``(x, record)`` as ``fastdfa.metrics.AlignmentLog`` or ``--log-alignment`` record them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError("no alignment records to plot: train fa or dfa with --log-alignment")
    fig, axes = plt.subplots(len(series), 2, figsize=(10, 3.2 * len(series)), squeeze=False)
    for row, (label, points) in enumerate(series.items()):
        xs = [x for x, _ in points]
        for col, (kind, title) in enumerate((("weight", "weight alignment (WA)"),
                                             ("gradient", "gradient alignment (GA)"))):
            ax = axes[row][col]
            for layer in points[0][1][kind]:
                ax.plot(xs, [r[kind].get(layer, float("nan")) for _, r in points], marker="o", markersize=3,
                        label=f"layer {layer}")
            ax.set_title(f"{label}: {title}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylim(-0.1, 1.05)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """tight_layout, write the PNG (creating its folder), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
