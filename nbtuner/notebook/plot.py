"""The loss curve, drawn on a plain matplotlib Figure with the Agg canvas and rendered to PNG.

No pyplot: a pyplot figure registers with a global manager, shows twice in notebooks when not
closed, and picks a GUI backend. A plain Figure is private to its owner and thread-agnostic.
One redraw costs 20-45 ms on a small CPU, so callers throttle (see ``TrainingPanel``).
"""
from __future__ import annotations

import io
from typing import Sequence

Points = Sequence[tuple[int, float]]


class LossPlot:
    """Keeps one figure and its two lines; ``png()`` updates the data and renders."""

    def __init__(self, width: float = 6.0, height: float = 2.6, dpi: int = 80) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(width, height), dpi=dpi)
        FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_subplot(1, 1, 1)
        (self.train_line,) = self.ax.plot([], [], color="#2563eb", linewidth=1.4, label="train")
        (self.val_line,) = self.ax.plot([], [], color="#dc2626", linewidth=1.4, marker="o", markersize=3,
                                        label="validation")
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss")
        self.ax.grid(True, alpha=0.3)
        self.figure.tight_layout(pad=0.6)
        self.renders = 0

    def png(self, train: Points, val: Points = (), total_steps: int | None = None) -> bytes:
        self.train_line.set_data([s for s, _ in train], [v for _, v in train])
        self.val_line.set_data([s for s, _ in val], [v for _, v in val])
        self.ax.relim()
        self.ax.autoscale_view()
        if total_steps:
            self.ax.set_xlim(0, max(total_steps, 1))
        handles = [h for h, pts in ((self.train_line, train), (self.val_line, val)) if len(pts)]
        legend = self.ax.get_legend()
        if legend is not None:
            legend.remove()
        if handles:
            self.ax.legend(handles=handles, loc="upper right", fontsize="small", frameon=False)
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png")
        self.renders += 1
        return buf.getvalue()


def loss_png(train: Points, val: Points = (), total_steps: int | None = None, **size: float) -> bytes:
    """One-off rendering (run summaries, reports)."""
    return LossPlot(**size).png(train, val, total_steps)  # type: ignore[arg-type]
