"""The command line: instant help, readable one-line errors with exit status 2, data commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbtuner.cli import main


def test_help_is_instant_and_imports_no_torch() -> None:
    code = ("import sys, contextlib, io\nfrom nbtuner.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_identity_then_check_without_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "id.json"
    assert main(["data", "identity", "--name", "Nova", "-n", "40", "-o", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 40 and "conversation" in records[0]
    assert main(["data", "check", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["n_records"] == 40 and report["n_duplicates"] == 0
    assert main(["data", "identity", "--name", "Nova", "-o", str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err


def test_invalid_record_is_one_line_naming_file_record_field(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "hi", "output": "ok"}, {"instruction": "hi"}]))
    assert main(["data", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err and "record 1" in err and "output" in err


def test_missing_files_and_bad_settings_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "r")]) == 2
    assert "none.json" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--data", "x.json", "--set", "lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert main(["chat", "--compare", "--prompt", "hi"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["train", "--method", "magic"])
    assert exc.value.code == 2
