"""What the live notebook panel costs: training throughput with the panel versus without.

Both arms run the same tiny model, data and steps on the notebook's worker thread (the
``%%finetune`` path); the panel arm also runs the cell's wait loop, which renders the panel
(labels up to 4x/s, the loss plot about 1x/s). Runs are interleaved and repeated because the
machine is shared; medians are reported, with process CPU seconds, which contention disturbs
less than wall time. A second part drives the panel with synthetic events at a fast step rate
and measures the CPU time the rendering thread spends per second.

    .venv/bin/python bench/notebook_panel_cost.py [STEPS] [REPEATS]
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    work = Path(tempfile.mkdtemp(prefix="nbtuner-panel-bench-"))

    from conftest import build_tiny_model
    from transformers.utils import logging as hf_logging

    from nbtuner import events as ev
    from nbtuner.config import load_config
    from nbtuner.data import identity_conversations, save_xtuner
    from nbtuner.notebook.magics import wait_for_run
    from nbtuner.notebook.plot import LossPlot
    from nbtuner.notebook.run import NotebookRun
    from nbtuner.notebook.widgets import TrainingPanel

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = build_tiny_model(work / "tiny")
    save_xtuner(identity_conversations("Nova", n=64), work / "data.json")  # no persona sidecar: no probes

    def cfg(name: str):
        return load_config(overrides=dict(model=str(model), data=str(work / "data.json"), method="lora",
                                          max_steps=steps, out=str(work / name), lr=1e-3, batch_size=4,
                                          eval_steps=0, save_steps=0, lora_r=8, lora_alpha=16, lora_dropout=0.0))

    def plain(name: str) -> tuple[float, float, float, int]:
        cpu = time.process_time()
        run = NotebookRun(cfg(name)).start([], force=True).wait()
        return run.result.tokens_per_s, run.result.elapsed_s, time.process_time() - cpu, 0

    def with_panel(name: str) -> tuple[float, float, float, int]:
        cpu = time.process_time()
        run = NotebookRun(cfg(name))
        run.panel = panel = TrainingPanel(run, widgets=True)
        run.start([panel], force=True)
        wait_for_run(run, panel, shell=None)  # the blocking cell's loop (no kernel: wait + refresh)
        run.wait()
        return run.result.tokens_per_s, run.result.elapsed_s, time.process_time() - cpu, panel.plot_renders

    arms = {"without panel": plain, "with panel": with_panel}
    with contextlib.redirect_stdout(io.StringIO()):
        for fn in arms.values():  # warm-up: imports, first model load
            fn("warmup")
    results: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in arms}
    print(f"tiny model, {steps} steps, batch 4, LoRA r=8; load average before: {os.getloadavg()[0]:.1f}")
    for i in range(repeats):
        for name, fn in arms.items():
            with contextlib.redirect_stdout(io.StringIO()):
                row = fn(f"{name.replace(' ', '_')}{i}")
            results[name].append(row)
            print(f"  {name:<14} {row[0]:7.0f} tokens/s  {row[1]:6.2f} s wall  {row[2]:6.2f} s CPU  "
                  f"{row[3]} plot redraws", flush=True)
    for name, rows in results.items():
        print(f"{name:<14} median {statistics.median(r[0] for r in rows):7.0f} tokens/s, "
              f"{statistics.median(r[1] for r in rows):6.2f} s wall, {statistics.median(r[2] for r in rows):6.2f} s CPU")
    print(f"load average after: {os.getloadavg()[0]:.1f}")

    # the plot alone
    plot = LossPlot()
    points = [(i, 5 - i / 100) for i in range(1, 300)]
    plot.png(points)
    t = time.perf_counter()
    for _ in range(10):
        plot.png(points, points[::10], 300)
    print(f"one loss-plot redraw (PNG): {(time.perf_counter() - t) / 10 * 1000:.0f} ms")

    # rendering cost per second of training at 20 steps/s, as the cell's wait loop does it
    panel = TrainingPanel(widgets=True)
    panel(ev.TrainStarted("runs/x", 10_000, 64, 0, "lora", "cpu", "fp32", 10_000))
    cpu, t0, step = time.thread_time(), time.perf_counter(), 0
    while time.perf_counter() - t0 < 10:
        step += 1
        panel(ev.StepLogged(step, 10_000, step / 16, 5 - step / 1e4, 1e-4, 5000.0, step / 20, 100.0))
        panel.refresh()
        time.sleep(0.05)
    spent = time.thread_time() - cpu
    print(f"synthetic 20 steps/s for 10 s: rendering used {spent * 1000 / 10:.0f} ms CPU per second "
          f"({panel.plot_renders} plot redraws)")


if __name__ == "__main__":
    main()
