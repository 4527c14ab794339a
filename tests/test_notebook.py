"""Magics and widgets in an in-process IPython shell, on the tiny model built in conftest.

The shell fixture's ``run`` raises instead of printing a traceback (as jupysql's tests do), so
a failing magic fails the test. Widgets are forced on with NBTUNER_DISPLAY=widgets where a test
clicks buttons: the in-process shell has no front end, but ipywidgets objects, their callbacks
and ``.click()`` work without one.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("IPython")
pytest.importorskip("ipywidgets")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from nbtuner import events as ev  # noqa: E402
from nbtuner.errors import ConfigError, DataError, NbtunerError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Small and fast: tiny model, LoRA (no bitsandbytes), high lr so the adapter visibly moves logits.
FAST = ("--method lora --set lr=1e-2 --set batch_size=4 --set lora_r=8 --set lora_alpha=16 "
        "--set lora_dropout=0 --set eval_max_new_tokens=4 --set max_length=96 --set replay_ratio=0")


class Shell:
    def __init__(self, shell: InteractiveShell) -> None:
        self.shell = shell

    def run(self, code: str):
        result = self.shell.run_cell(code)
        result.raise_error()
        return result.result

    @property
    def ns(self) -> dict:
        return self.shell.user_ns

    @property
    def state(self):
        from nbtuner.notebook.magics import get_state

        return get_state(self.shell)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb")
    old = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(old)


@pytest.fixture(scope="module")
def ip(workdir, tiny_model_dir):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbtuner")
    wrapped = Shell(shell)
    wrapped.ns["TINY"] = str(tiny_model_dir)
    wrapped.run("%nbtuner data identity --name Nova -n 24 -o identity.json --force")
    yield wrapped
    wrapped.state.callbacks.clear()


@pytest.fixture
def widgets_on(monkeypatch):
    monkeypatch.setenv("NBTUNER_DISPLAY", "widgets")


@pytest.fixture(scope="module")
def trained(ip, tiny_model_dir):
    """One real 4-step run through the cell magic with the widget panel, shared by several tests."""
    os.environ["NBTUNER_DISPLAY"] = "widgets"
    try:
        run = ip.run(f"""%%finetune --model {tiny_model_dir} --data identity.json --max-steps 4 --out runs/main -o run {FAST}
eval_steps: 2
save_steps: 2
""")
    finally:
        os.environ.pop("NBTUNER_DISPLAY", None)
    return run


# ---------------------------------------------------------------------------------------- loading
def test_load_is_instant_and_imports_no_heavy_library():
    code = """
import sys, time
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
t = time.perf_counter()
ip.run_line_magic("load_ext", "nbtuner")
elapsed = time.perf_counter() - t
heavy = [m for m in ("torch", "transformers", "peft", "matplotlib", "ipywidgets") if m in sys.modules]
magics = ip.magics_manager.magics
print(elapsed, heavy, "finetune" in magics["cell"], "finetune" in magics["line"], "chat" in magics["line"],
      "nbtuner" in magics["line"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "%%finetune" in lines[0] and "%chat" in lines[0]  # the one line saying what is available
    elapsed, rest = lines[-1].split(" ", 1)
    assert rest == "[] True True True True"
    assert float(elapsed) < 3.0


def test_nothing_outside_the_notebook_layer_imports_ui_libraries():
    pattern = re.compile(r"^\s*(import|from)\s+(IPython|ipywidgets|ipykernel|matplotlib\.pyplot|matplotlib)\b",
                         re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "nbtuner").rglob("*.py")
                 if "notebook" not in p.relative_to(REPO / "nbtuner").parts and pattern.search(p.read_text())]
    assert offenders == []
    code = """
import sys
import nbtuner, nbtuner.config, nbtuner.events, nbtuner.train, nbtuner.chat, nbtuner.export, nbtuner.models
import nbtuner.data, nbtuner.cli, nbtuner.errors
print([m for m in ("IPython", "ipywidgets", "ipykernel", "matplotlib.pyplot", "matplotlib") if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_notebook_layer_never_uses_pyplot():
    sources = "".join(p.read_text() for p in (REPO / "nbtuner" / "notebook").glob("*.py"))
    assert not re.search(r"(import|from)\s+matplotlib\.pyplot|from\s+matplotlib\s+import\s+.*pyplot", sources)
    assert "FigureCanvasAgg" in sources


# ---------------------------------------------------------------------------------------- help and flags
def test_magics_have_real_help(ip):
    doc = ip.shell.find_line_magic("finetune").__doc__
    for flag in ("--model", "--data", "--method", "--epochs", "--max-steps", "--out", "--set", "--force",
                 "--background", "-o NAME"):
        assert flag in doc
    assert ip.shell.find_cell_magic("finetune").__doc__ == doc
    chat_doc = ip.shell.find_line_magic("chat").__doc__
    for flag in ("--adapter", "--run", "--compare", "--system", "--max-new-tokens"):
        assert flag in chat_doc
    nb_doc = ip.shell.find_line_magic("nbtuner").__doc__
    for command in ("model", "data identity", "data check", "convert", "merge", "runs"):
        assert f"%nbtuner {command}" in nb_doc


@pytest.mark.parametrize("line, message", [
    ("%finetune --bogus", "unrecognized arguments"),
    ("%finetune --epochs 1 --max-steps 2", "not both"),
    ("%finetune --method sgd", "invalid choice"),
    ("%finetune --max-steps many", "invalid int value"),
    ("%finetune --set lrr=1e-4", "did you mean 'lr'"),
    ("%finetune --set lr", "KEY=VALUE"),
    ("%finetune -o 1run", "Python name"),
    ("%chat --max-new-tokens 0 hi", "at least 1"),
    ("%chat --bogus hi", "unrecognized arguments"),
    ("%nbtuner frobnicate", "invalid choice"),
    ("%nbtuner data identity -o x.json", "--name"),
    ("%nbtuner data", "identity or check"),
])
def test_bad_flags_raise_usage_error(ip, line, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        ip.run(line)


def test_yaml_cell_errors_are_usage_errors(ip):
    with pytest.raises(UsageError, match="unknown setting 'learning_rate'"):
        ip.run("%%finetune --data identity.json\nlearning_rate: 1e-4\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        ip.run("%%finetune --data identity.json\nlr: [1e-4\n")


def test_engine_errors_show_one_readable_line(ip, tiny_model_dir, capsys):
    with pytest.raises(NbtunerError) as info:
        ip.run(f"%finetune --model {tiny_model_dir} --data missing.json --display text")
    assert isinstance(info.value, (ConfigError, DataError))
    rendered = info.value._render_traceback_()
    assert len(rendered) == 1 and "missing.json" in rendered[0]
    capsys.readouterr()
    ip.shell.run_cell(f"%finetune --model {tiny_model_dir} --data missing.json --display text")
    err = capsys.readouterr()
    assert "missing.json" in err.out + err.err and "Traceback" not in err.out + err.err


def test_chat_line_keeps_the_prompt_verbatim():
    from nbtuner.notebook.magics import split_chat_line

    assert split_chat_line("--compare What's your name?") == ("--compare", "What's your name?")
    assert split_chat_line('--system "You are #1" --max-new-tokens 5 hi  there') == \
        ('--system "You are #1" --max-new-tokens 5', "hi  there")
    assert split_chat_line("-- -5 degrees?") == ("", "-5 degrees?")


def test_a_chat_question_mark_is_not_a_help_request(ip):
    assert ip.shell.transform_cell("%chat Who are you?") == "get_ipython().run_line_magic('chat', 'Who are you?')\n"
    assert "pinfo" in ip.shell.transform_cell("%chat?")
    assert "pinfo" in ip.shell.transform_cell("%finetune?")


# ---------------------------------------------------------------------------------------- data and model
def test_data_magics(ip, tiny_model_dir):
    records = json.loads(Path("identity.json").read_text())
    assert len(records) == 24
    card = ip.run(f"%nbtuner model {tiny_model_dir}")
    assert card.parameters > 0 and card.chat_template and "<code>" in card._repr_html_()
    report = ip.run("%nbtuner data check identity.json --max-length 64")
    assert report.n_records == 24 and report.tokenized and report.max_length == 64
    assert "Dataset check" in report._repr_html_()
    with pytest.raises(NbtunerError, match="already exists"):
        ip.run("%nbtuner data identity --name Nova -n 24 -o identity.json")


def test_quoted_magic_values_arrive_without_their_quotes(ip):
    from nbtuner.data import load_conversations
    from nbtuner.data.identity import PERSONA_SIDECAR
    from nbtuner.notebook.magics import _split

    ip.run('%nbtuner data identity --name "Nova Prime" --creator "Ada Lab" -n 4 -o quoted.json --force')
    persona = json.loads(Path("quoted.json" + PERSONA_SIDECAR).read_text())["persona"]
    answers = " ".join(c[-1]["content"] for c in load_conversations("quoted.json"))
    assert persona == "Nova Prime" and "Nova Prime" in answers and '"' not in answers
    assert _split("""--set "system=Be brief" --creator 'Ada Lab' x""") == ["--set", "system=Be brief", "--creator",
                                                                       "Ada Lab", "x"]


# ---------------------------------------------------------------------------------------- training
def test_finetune_cell_binds_a_run_with_losses_and_adapter(ip, trained):
    run = ip.ns["run"]
    assert run is trained
    assert run.status == "completed" and run.step == 4
    assert [s for s, _ in run.losses] == [1, 2, 3, 4]
    assert all(isinstance(v, float) for _, v in run.losses)
    assert run.adapter_dir is not None and (run.adapter_dir / "adapter_config.json").is_file()
    assert {s["step"] for s in run.samples} == {0, 2, 4}
    # the dataset came from %nbtuner data identity, so the run knows its persona and probes it
    assert Path("identity.json.nbtuner.json").is_file()
    assert [p[0] for p in run.probes] == [0, 2, 4] and all(0 <= p[1] <= 1 and 0 <= p[2] <= 1 for p in run.probes)
    assert "NotebookRun run(status=completed" in repr(run)
    page = run._repr_html_()
    assert "completed" in page and "data:image/png;base64," in page
    panel = run.panel
    assert panel.widgets and panel.progress.value == 4 and panel.progress.max == 4
    assert "completed" in panel.progress_label.value
    assert "tokens/s" in panel.stats.value and "learning rate" in panel.stats.value
    assert bytes(panel.image.value).startswith(b"\x89PNG") and panel.plot_renders >= 1
    assert "step 0 (before training)" in panel.samples.value and "step 4" in panel.samples.value
    assert "identity <b>" in panel.probes_html.value and "leakage <b>" in panel.probes_html.value
    assert panel.after.layout.display is None and panel.stop_button.layout.display == "none"
    table = ip.run("%nbtuner runs")
    assert any(r["run"] == "main" and r["status"] == "completed" and r["steps"] == 4 for r in table)
    assert "main" in table._repr_html_() and "main" in repr(table)


def test_stop_button_during_training_leaves_a_usable_checkpoint(ip, tiny_model_dir, widgets_on, tmp_path):
    clicked = threading.Event()

    def click_after_first_step(event):
        if isinstance(event, ev.StepLogged) and not clicked.is_set():
            clicked.set()
            ip.state.last_panel.stop_button.click()  # what the front end's click triggers

    ip.state.callbacks.append(click_after_first_step)
    try:
        run = ip.run(f"%finetune --model {tiny_model_dir} --data identity.json --max-steps 50 --out runs/stop "
                     f"-o stopped {FAST} --set eval_steps=0 --set save_steps=0")
    finally:
        ip.state.callbacks.remove(click_after_first_step)
    assert clicked.is_set()
    assert run.status == "stopped"
    assert 1 <= run.step < 50
    assert run.panel.stop_button.description == "Stopping…" or run.panel.stop_button.layout.display == "none"
    assert "stopped" in run.panel.progress_label.value
    assert run.checkpoints, "stopping must save a checkpoint"
    checkpoint = Path(run.checkpoints[-1])
    assert (checkpoint / "trainer_state.json").is_file()
    exported = run.convert(out=tmp_path / "from_checkpoint", checkpoint=checkpoint)
    assert (exported.path / "adapter_model.safetensors").is_file() and exported.checks["tensors"] > 0
    record = json.loads((run.run_dir / "run.json").read_text())
    assert record["status"] == "stopped"


def test_background_text_mode_returns_at_once_and_prints_progress(ip, tiny_model_dir, capsys):
    run = ip.run(f"%finetune --model {tiny_model_dir} --data identity.json --max-steps 2 --out runs/bg "
                 f"--background --display text {FAST} --set eval_steps=0 --set save_steps=0")
    assert run.result is None  # returned before training finished
    assert run.wait(timeout=300) is run
    assert run.status == "completed" and len(run.losses) == 2
    out = capsys.readouterr().out
    assert "step 1/2" in out and "training completed at step 2" in out


# ---------------------------------------------------------------------------------------- panel buttons
def test_convert_button_writes_an_adapter_folder(trained):
    panel = trained.panel
    panel.convert_button.click()
    out = trained.run_dir / "hf_adapter"
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    assert "adapter</b> written to" in panel.export_output.value
    panel.convert_button.click()  # again, without "replace existing": a readable error, no traceback
    assert "already exists" in panel.export_output.value and "error" in panel.export_output.value


def test_merge_button_writes_a_verified_model(trained, tmp_path):
    panel = trained.panel
    panel.merge_out.value = str(tmp_path / "merged")
    panel.shard_size.value = "100KB"
    panel.merge_button.click()
    html_out = panel.export_output.value
    assert "merged</b> written to" in html_out, html_out
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file()
    shards = list(merged.glob("model*.safetensors"))
    assert len(shards) > 1  # the shard-size box was honoured
    assert "verified" in html_out


def test_chat_button_opens_a_side_by_side_chat(trained):
    panel = trained.panel
    chat = panel.open_chat()
    assert chat is not None and panel.chat_box.children == (chat.widget,)
    base, tuned = chat.send("Who are you?")
    assert isinstance(base, str) and isinstance(tuned, str)
    assert len(chat.history) == 1 and chat.history[0]["prompt"] == "Who are you?"
    assert "Who are you?" in chat.base_html.value and "Who are you?" in chat.tuned_html.value


# ---------------------------------------------------------------------------------------- chat
def test_chat_widget_send_puts_the_answer_in_history(ip, tiny_model_dir):
    widget = ip.run(f"%chat --model {tiny_model_dir} --max-new-tokens 4 --clear")
    from nbtuner.notebook.widgets import ChatWidget

    assert isinstance(widget, ChatWidget) and not widget.compare
    assert widget.max_new_tokens.value == 4
    widget.prompt.value = "Hello there"  # Enter in the text box commits the value
    assert len(widget.history) == 1 and widget.history[0][0] == "Hello there"
    assert isinstance(widget.history[0][1], str)
    assert widget.prompt.value == "" and "Hello there" in widget.history_html.value
    widget.send_button.click()  # an empty box sends nothing
    assert len(widget.history) == 1
    widget.send("And again?")
    assert len(widget.history) == 2  # single-model chat keeps the conversation
    widget.clear_button.click()
    assert widget.history == [] and "Hello" not in widget.history_html.value


def test_chat_magic_streams_an_answer(ip, tiny_model_dir, capsys, trained):
    assert ip.run(f"%chat --model {tiny_model_dir} --max-new-tokens 3 --clear What's up?") is None
    session = ip.state.sessions.get(str(tiny_model_dir))
    assert session.history[-1][0] == "What's up?"
    capsys.readouterr()
    ip.run("%chat --run run --compare --max-new-tokens 3 Who are you?")
    out = capsys.readouterr().out
    assert "base :" in out and "tuned:" in out


def test_compare_widget_shows_two_answers(ip, trained):
    widget = ip.run("%chat --run run --compare --max-new-tokens 4")
    assert widget.compare
    widget.prompt.value = "Please introduce yourself"
    assert len(widget.history) == 1
    turn = widget.history[0]
    assert set(turn) == {"prompt", "base", "tuned"}
    assert widget.base_html.value.count("Please introduce yourself") == 1
    assert widget.tuned_html.value.count("Please introduce yourself") == 1
    comparison = trained.compare(["Who are you?", "What is 2+2?"])
    assert [(b.model, t.model) for b, t in comparison] == [("base", "tuned")] * 2
    assert "<th style='text-align:left'>tuned</th>" in comparison._repr_html_()


def test_compare_without_adapter_is_a_usage_error(ip, tiny_model_dir):
    with pytest.raises(UsageError, match="needs a tuned model"):
        ip.run(f"%chat --model {tiny_model_dir} --compare hi")


def test_model_output_is_escaped_everywhere(ip, trained, monkeypatch):
    import nbtuner.chat as chat_module

    evil = "<script>alert(1)</script>"

    def fake_generate(model, tokenizer, batch, settings=None, on_text=None):
        if on_text is not None:
            on_text(evil)
        return [evil] * len(batch)

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    single = ip.run(f"%chat --model {ip.ns['TINY']} --clear")
    single.send("<b>prompt</b>")
    compare = ip.run("%chat --run run --compare")
    compare.send("hi")
    pages = [single.history_html.value, compare.base_html.value, compare.tuned_html.value,
             trained.compare(["hi"])._repr_html_()]
    for page in pages:
        assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>prompt</b>" not in single.history_html.value

    from nbtuner.notebook.widgets import TrainingPanel

    panel = TrainingPanel(widgets=True)
    panel(ev.SamplesGenerated(0, (("<i>q</i>", evil),)))
    panel(ev.Notice("<img src=x onerror=alert(1)>"))
    panel.refresh(force=True)
    assert "<script>" not in panel.samples.value and "&lt;script&gt;" in panel.samples.value
    assert "<i>q</i>" not in panel.samples.value
    assert "<img" not in panel.notices_html.value


def test_panel_throttles_plot_redraws():
    from nbtuner.notebook.widgets import TrainingPanel

    panel = TrainingPanel(widgets=True, plot_interval=3600, text_interval=0)
    panel(ev.TrainStarted("runs/x", 100, 10, 0, "lora", "cpu", "fp32", 1000))
    for step in range(1, 51):
        panel(ev.StepLogged(step, 100, step / 10, 5.0 - step / 100, 1e-4, 100.0, step, 100 - step))
        panel.refresh()
    assert panel.plot_renders == 1  # the first redraw, then nothing within the interval
    assert panel.progress.value == 50 and "step 50/100" in panel.progress_label.value
    panel.refresh(force=True)
    assert panel.plot_renders == 2


def test_text_panel_prints_console_lines(capsys):
    from nbtuner.notebook.widgets import TrainingPanel

    panel = TrainingPanel(widgets=False)
    panel(ev.StepLogged(1, 2, 0.5, 3.25, 1e-4, 100.0, 1.0, 1.0))
    panel(ev.TrainFinished("completed", 2, "runs/x", "runs/x/adapter", 3.0, 2.0))
    out = capsys.readouterr().out
    assert "step 1/2  loss 3.2500" in out and "training completed at step 2" in out
    assert panel._repr_mimebundle_() == {"text/plain": "TrainingPanel(completed at step 2)"}


def test_display_mode_detection(monkeypatch):
    from nbtuner.notebook.frontend import use_widgets

    class ZMQInteractiveShell:
        pass

    monkeypatch.delenv("NBTUNER_DISPLAY", raising=False)
    assert use_widgets("auto", ZMQInteractiveShell()) is True
    assert use_widgets("auto", InteractiveShell.instance()) is False
    assert use_widgets("text", ZMQInteractiveShell()) is False
    monkeypatch.setenv("NBTUNER_DISPLAY", "widgets")
    assert use_widgets("auto", InteractiveShell.instance()) is True


def test_magic_convert(ip, trained, tmp_path):
    result = ip.run(f"%nbtuner convert {trained.checkpoints[-1]} {tmp_path / 'adapter'}")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "adapter" in str(result)


# ---------------------------------------------------------------------------------------- real model
@pytest.mark.integration
def test_smollm2_card_and_chat(ip, capsys):
    card = ip.run("%nbtuner model smollm2")
    assert 100e6 < card.parameters < 200e6
    ip.run("%chat --max-new-tokens 12 --clear Who are you?")
    assert capsys.readouterr().out.strip()
