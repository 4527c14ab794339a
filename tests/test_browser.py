"""Tier 5: a real browser. JupyterLab on 127.0.0.1, Debian's Chromium driven by Playwright.

The test writes a short notebook (the course's path in miniature), runs it with "Run All Cells",
and checks what a person would see: the training panel and the side-by-side chat are rendered as
live widgets (not their text fallbacks); clicking Stop ends training with a checkpoint, clicking
Merge writes a verified merged model, and clicking Send gets answers from base and tuned.
Screenshots are kept in test-artifacts/browser/.

Needs `apt-get install -y chromium` and the `browser` extra (jupyterlab, playwright); `make test`
installs both. Playwright never downloads a browser here: it is given Debian's. Without them the
test is skipped locally and fails under CI (CI=true), so a broken install cannot pass unnoticed.
Adapted from shared/examples/jupyterlab_browser_fixture.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import exclusive_artifacts

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KERNEL_TIMEOUT = 120_000   # ms: kernel start and the first imports
STEP_TIMEOUT = 300_000     # ms: model load, QLoRA set-up and the first training steps on a busy 2-core CPU
ACTION_TIMEOUT = 240_000   # ms: a merge with verification, or a chat answer

NOTEBOOK_CELLS = [
    "%load_ext nbtuner",
    "%nbtuner data identity --name Nova -n 48 -o identity.json --force",
    # Long enough that the test's Stop click, not the step limit, ends it; lr/warm-up chosen so a few steps
    # already change the model enough for the merge verification to tell it from the base.
    "%%finetune --data identity.json --out runs/browser --max-steps 60 --force -o run "
    "--set eval_steps=0 --set save_steps=0 --set replay_ratio=0\n"
    "method: qlora\nlora_r: 16\nlora_alpha: 32\nlora_dropout: 0.0\nlr: 1.0e-3\nwarmup_ratio: 0.0\n"
    "batch_size: 2\nmax_length: 128",
    'print("TRAINING-ENDED", run.status, run.step)',
    "%chat --run run --compare --max-new-tokens 24",
]


def _missing() -> list[str]:
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"Debian's Chromium at {CHROMIUM} (apt-get install -y chromium)")
    for module in ("jupyterlab", "playwright"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package '{module}' (pip install -e '.[browser]')")
    return missing


@pytest.fixture
def requirements() -> None:
    missing = _missing()
    if missing:
        message = "the browser test needs " + "; ".join(missing) + ". `make install` installs them."
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def artifacts():
    with exclusive_artifacts("browser") as folder:
        yield folder


@pytest.fixture
def jupyterlab(requirements, artifacts, tmp_path):
    """JupyterLab on 127.0.0.1 with a private config; its root folder is test-artifacts/browser/root."""
    root = artifacts / "root"
    root.mkdir(parents=True)
    config = tmp_path / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "default_setting_overrides.json").write_text(json.dumps({
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}))
    env = {k: v for k, v in os.environ.items() if k != "NBTUNER_DISPLAY"}  # auto: widgets in the kernel
    env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
               JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1")
    port, token = _free_port(), "nbtuner-browser-test"
    log_path = artifacts / "jupyterlab.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
                break
            except OSError:
                assert time.time() < deadline, "JupyterLab did not start within 90 s:\n" + log_path.read_text()
                time.sleep(0.3)
        yield {"base": base, "token": token, "root": root, "artifacts": artifacts}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _write_notebook(path: Path) -> None:
    import nbformat

    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    book.cells = [nbformat.v4.new_code_cell(source) for source in NOTEBOOK_CELLS]
    nbformat.write(book, path)


def _cell_output(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea")


def test_training_panel_and_chat_in_jupyterlab(jupyterlab):
    from playwright.sync_api import expect, sync_playwright

    _write_notebook(jupyterlab["root"] / "course.ipynb")
    out = jupyterlab["artifacts"]
    shots = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        try:
            page.goto(f"{jupyterlab['base']}/lab/tree/course.ipynb?token={jupyterlab['token']}")
            expect(page.locator("#jp-main-statusbar")).to_contain_text("| Idle", timeout=KERNEL_TIMEOUT)
            page.click('.lm-MenuBar-itemLabel:text-is("Run")')
            page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')

            # --- the training panel, live
            panel = _cell_output(page, 2)
            stop = panel.get_by_role("button", name="Stop")
            expect(stop).to_be_visible(timeout=STEP_TIMEOUT)
            progress = panel.get_by_text(re.compile(r"step \d+/60"))
            deadline = time.time() + STEP_TIMEOUT / 1000
            while True:  # enough logged steps for the loss curve to have a shape
                text = progress.first.text_content(timeout=STEP_TIMEOUT) if progress.count() else ""
                match = re.search(r"step (\d+)/60", text or "")
                if match and int(match.group(1)) >= 8:
                    break
                assert time.time() < deadline, f"training did not reach step 8: {text!r}"
                time.sleep(1)
            expect(panel.locator(".widget-hprogress .progress-bar").first).to_be_visible()
            loss_plot = panel.locator("img.widget-image")
            expect(loss_plot).to_be_visible(timeout=60_000)   # the loss curve (a PNG in an Image widget)
            assert loss_plot.evaluate("img => img.naturalWidth") > 100
            panel_widget = panel.locator(".widget-vbox").first
            shots["panel-training"] = out / "panel-training.png"
            panel_widget.screenshot(path=str(shots["panel-training"]))

            # --- Stop: the cell is still running, and the click must reach the kernel anyway
            stop.click()
            expect(panel.get_by_text(re.compile(r"stopped at step \d+"))).to_be_visible(timeout=ACTION_TIMEOUT)
            expect(_cell_output(page, 3)).to_contain_text("TRAINING-ENDED stopped", timeout=60_000)

            # --- the side-by-side chat widget (the next cell) and its Send button
            chat = _cell_output(page, 4)
            send = chat.get_by_role("button", name="Send")
            expect(send).to_be_visible(timeout=ACTION_TIMEOUT)
            expect(chat.get_by_text("tuned", exact=True)).to_be_visible()

            # --- Merge, from the panel that appeared when training ended
            merge = panel.get_by_role("button", name="Merge")
            expect(merge).to_be_visible()
            merge.click()
            expect(panel).to_contain_text("verified", timeout=ACTION_TIMEOUT)
            expect(panel).to_contain_text("merged written to")
            shots["panel-merged"] = out / "panel-merged.png"
            panel_widget.screenshot(path=str(shots["panel-merged"]))

            # --- Send: base and tuned answer the same question side by side
            chat.get_by_placeholder("Ask something and press Enter").fill("Please introduce yourself")
            send.click()
            bubbles = chat.locator(".widget-html-content").get_by_text("Please introduce yourself")
            expect(bubbles).to_have_count(2, timeout=ACTION_TIMEOUT)   # the question in both columns
            expect(chat.get_by_text(re.compile("answering"))).to_have_count(0, timeout=ACTION_TIMEOUT)
            expect(send).to_be_enabled(timeout=ACTION_TIMEOUT)
            shots["chat-compare"] = out / "chat-compare.png"
            chat.locator(".widget-vbox").first.screenshot(path=str(shots["chat-compare"]))

            # --- widgets, not their text fallbacks
            outputs = page.locator(".jp-OutputArea-output")
            for fallback in ("VBox(children", "TrainingPanel(", "ChatWidget(", "Error displaying widget",
                             "Loading widget"):
                assert outputs.filter(has_text=fallback).count() == 0, f"a widget showed as text: {fallback}"
        finally:
            page.screenshot(path=str(out / "lab.png"))
            (out / "console-errors.txt").write_text("\n".join(console_errors))
            browser.close()

    root = jupyterlab["root"]
    record = json.loads((root / "runs" / "browser" / "run.json").read_text())
    assert record["status"] == "stopped" and 8 <= record["steps"] < 60
    merged = root / "runs" / "browser" / "merged"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    for path in shots.values():
        assert path.stat().st_size > 5_000, path
