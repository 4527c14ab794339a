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
        self.rates = None  # a second axis for identity / leakage rates, made when the first arrive
        # fixed margins (tight_layout on every redraw costs time): room for the legend above
        self.figure.subplots_adjust(left=0.1, right=0.9, top=0.86, bottom=0.2)
        self.renders = 0

    def _rates_axis(self) -> None:
        self.rates = self.ax.twinx()
        self.rates.set_ylim(-0.02, 1.02)
        self.rates.set_ylabel("rate")
        (self.identity_line,) = self.rates.plot([], [], color="#16a34a", linestyle="--", marker="s", markersize=3,
                                                label="identity")
        (self.leakage_line,) = self.rates.plot([], [], color="#9333ea", linestyle=":", marker="^", markersize=3,
                                               label="leakage")

    def png(self, train: Points, val: Points = (), total_steps: int | None = None,
            probes: Sequence[tuple[int, float, float]] = ()) -> bytes:
        """Loss curves, plus identity and leakage rates (0-1, right axis) when `probes` is given."""
        self.train_line.set_data([s for s, _ in train], [v for _, v in train])
        self.val_line.set_data([s for s, _ in val], [v for _, v in val])
        self.ax.relim()
        self.ax.autoscale_view()
        if total_steps:
            self.ax.set_xlim(0, max(total_steps, 1))
        handles = [h for h, pts in ((self.train_line, train), (self.val_line, val)) if len(pts)]
        if probes:
            if self.rates is None:
                self._rates_axis()
            self.identity_line.set_data([p[0] for p in probes], [p[1] for p in probes])
            self.leakage_line.set_data([p[0] for p in probes], [p[2] for p in probes])
            if total_steps:
                self.rates.set_xlim(0, max(total_steps, 1))
            handles += [self.identity_line, self.leakage_line]
        top = self.rates if self.rates is not None else self.ax  # drawn last, so nothing covers the legend
        for axis in (self.ax, self.rates):
            if axis is not None and axis.get_legend() is not None:
                axis.get_legend().remove()
        if handles:
            top.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles),
                       fontsize="small", frameon=False)
        buf = io.BytesIO()
        # zlib level 1: about a third faster than the default level 6, for a slightly larger PNG
        self.figure.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
        self.renders += 1
        return buf.getvalue()


def loss_png(train: Points, val: Points = (), total_steps: int | None = None,
             probes: Sequence[tuple[int, float, float]] = (), **size: float) -> bytes:
    """One-off rendering (run summaries, reports)."""
    return LossPlot(**size).png(train, val, total_steps, probes)  # type: ignore[arg-type]
