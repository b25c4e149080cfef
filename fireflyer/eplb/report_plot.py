"""`fireflyer eplb report --png`: the same heatmap and per-layer balancedness as a matplotlib plot
(the optional extra `plot`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from fireflyer.eplb.report import ReportError, layer_balancedness


def write_png(table: npt.ArrayLike, layers: range, title: str, path: Path) -> None:
    """Left: each GPU's load / its layer's mean, per MoE layer; right: each layer's balancedness."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ReportError(
            "--png needs matplotlib: pip install 'fireflyer[plot]' (the optional extra `plot`)"
        ) from exc
    loads = np.asarray(table, dtype=np.float64)[layers.start : layers.stop]
    mean = loads.mean(axis=1, keepdims=True)
    ratio = np.divide(loads, mean, out=np.zeros_like(loads), where=mean > 0)
    per_layer = layer_balancedness(loads)
    rows = np.arange(layers.start, layers.stop)
    height = max(3.0, 0.18 * len(rows) + 1.5)
    width = max(6.0, 0.12 * loads.shape[1] + 4.0)
    fig, (heat, bars) = plt.subplots(
        1, 2, figsize=(width, height), gridspec_kw={"width_ratios": [4, 1]}, sharey=True
    )
    image = heat.imshow(
        ratio,
        aspect="auto",
        cmap="coolwarm",
        vmin=0.0,
        vmax=2.0,
        interpolation="nearest",
        extent=(-0.5, loads.shape[1] - 0.5, rows[-1] + 0.5, rows[0] - 0.5),
    )
    heat.set_xlabel("GPU")
    heat.set_ylabel("MoE layer")
    heat.set_title(title)
    fig.colorbar(image, ax=heat, label="load / layer mean")
    bars.barh(rows, per_layer, color="tab:green")
    bars.set_xlim(0, 1)
    bars.set_xlabel("balancedness (mean/max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["write_png"]
