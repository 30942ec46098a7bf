"""training.png beside each model.json: the loss curve and the measured bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rnnserve.models.contract import ModelSpec


def plot_training(
    losses: list[float], metrics: dict[str, float], spec: ModelSpec, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss per step")
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    ax.set_title(
        f"{spec.name} v{spec.version}: {spec.layers}x{spec.cell}({spec.units})\n{shown}", fontsize=8
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
