"""Tier 4: every teaching notebook in notebooks/ runs top to bottom in a real kernel (nbclient).

Each notebook has a cell tagged ``parameters``; as papermill does, a cell with the values below is
injected right after it, so training runs a handful of steps instead of the lesson's 40 or 50. The
notebooks run in order in one shared working folder, so lessons 04 and 05 reuse lesson 03's run
(each would train its own if run alone). Executed copies, with their outputs, and the time each
notebook took are kept in test-artifacts/notebooks/. A notebook may stop itself by raising an
exception named ``SkipNotebook`` (lesson 06 without CUDA): that is reported as a skip.

The kernel inherits NBTUNER_HOME from the test session (tests/conftest.py), so the converted
SmolLM2 and the replay cache are shared with the other tests.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import exclusive_artifacts

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from nbclient.exceptions import CellExecutionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 900

# Short settings for CI: a few training steps, no in-training evaluation, a tiny replay set.
PARAMETERS: dict[str, dict[str, object]] = {
    "01_setup_and_base_model": {"MAX_NEW_TOKENS": 24},
    "02_data": {},
    "03_finetune": {"MAX_STEPS": 4, "EVAL_STEPS": 0, "SAVE_STEPS": 2},
    "04_convert_and_merge": {"MAX_STEPS": 4},
    "05_after_and_overfitting": {"MAX_STEPS": 4, "EVAL_STEPS": 0, "N_REPLAY_PROMPTS": 4, "MAX_NEW_TOKENS": 24,
                                 "REPLAY_MAX_NEW_TOKENS": 24},
    "06_gpu_larger_model": {"MAX_STEPS": 4},
}

pytestmark = pytest.mark.notebooks


def inject_parameters(book, values: dict[str, object]):
    """Papermill's convention: a cell tagged ``injected-parameters`` after the ``parameters`` cell."""
    index = next((i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", [])), None)
    assert index is not None, "the notebook has no cell tagged 'parameters'"
    if values:
        source = "# Parameters injected by tests/test_notebooks.py\n" + "".join(
            f"{name} = {value!r}\n" for name, value in values.items())
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        cell["id"] = "injected-parameters"
        book.cells.insert(index + 1, cell)
    return book


@pytest.fixture(scope="module")
def workdir():
    with exclusive_artifacts("notebooks") as folder:
        yield folder


def test_the_course_is_there():
    names = [p.stem for p in NOTEBOOKS]
    assert names == sorted(PARAMETERS), f"notebooks and test parameters differ: {names}"


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(book.cells)
                 if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
        assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"
        assert any("parameters" in c.metadata.get("tags", []) for c in book.cells), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NBTUNER_DISPLAY", raising=False)  # auto: live widgets, as in JupyterLab
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    book = inject_parameters(nbformat.read(path, as_version=4), PARAMETERS.get(path.stem, {}))
    client = nbclient.NotebookClient(book, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    skipped = None
    try:
        client.execute()
    except CellExecutionError as error:
        if error.ename != "SkipNotebook":
            raise
        skipped = error.evalue
    finally:
        elapsed = time.perf_counter() - start
        nbformat.write(book, workdir / path.name)
        timings = workdir / "timings.json"
        record = json.loads(timings.read_text()) if timings.exists() else {}
        record[path.stem] = {"seconds": round(elapsed, 1), "skipped": skipped}
        timings.write_text(json.dumps(record, indent=2))
    if skipped is not None:
        pytest.skip(f"{path.name} skipped itself: {skipped}")

    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    if path.stem in ("03_finetune", "05_after_and_overfitting"):
        widget_views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert widget_views, f"{path.name}: the training panel was not displayed as a widget"
    if path.stem == "03_finetune":
        run_dir = workdir / "work" / "runs" / "nova"
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "completed" and record["steps"] == PARAMETERS[path.stem]["MAX_STEPS"]
        demo = json.loads((workdir / "work" / "runs" / "stop-demo" / "run.json").read_text())
        assert demo["status"] == "stopped", demo["status"]
    if path.stem == "04_convert_and_merge":
        for folder in ("work/runs/nova/hf_adapter", "work/exports/nova-adapter"):
            assert (workdir / folder / "adapter_config.json").is_file(), folder
        for folder in ("work/runs/nova/merged", "work/exports/nova-merged"):
            assert (workdir / folder / "config.json").is_file(), folder
            assert json.loads((workdir / folder / "nbtuner_merge.json").read_text()).get("merged_into"), folder
    if path.stem == "05_after_and_overfitting":
        for run in ("nova", "nova-replay"):
            report = json.loads((workdir / "work" / "runs" / run / "identity_report.json").read_text())
            assert 0.0 <= report["identity_rate"] <= 1.0 and 0.0 <= report["leakage_rate"] <= 1.0
        assert os.path.getsize(workdir / "work" / "configs" / "replay.yaml") > 0
        last = [c for c in book.cells if c.cell_type == "code"][-1]  # the lesson ends on the report
        html = "".join(o.get("data", {}).get("text/html", "") for o in last.get("outputs", []))
        assert "identity rate" in html and "leakage rate" in html and "<th>base</th><th>tuned</th>" in html
