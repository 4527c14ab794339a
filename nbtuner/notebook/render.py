"""Small HTML and text helpers shared by the widgets, the run object and the magics.

No widget library here: run summaries and tables must render in plain IPython, nbconvert output
and CI logs too. Model output is untrusted: everything that came from a model or a user goes
through ``html.escape``.
"""
from __future__ import annotations

import base64
import html
from typing import Any, Sequence

from ..errors import NbtunerError

esc = html.escape


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, NbtunerError) else f"{type(exc).__name__}: {exc}"


def error_html(exc: BaseException) -> str:
    return f"<div style='color:#b91c1c'><b>error:</b> {esc(error_text(exc))}</div>"


def samples_table(first: tuple[int, Sequence[tuple[str, str]]] | None,
                  last: tuple[int, Sequence[tuple[str, str]]] | None) -> str:
    """Evaluation prompts as rows; the first sampled step (usually the untrained model) and the
    latest as columns. Everything escaped."""
    if last is None:
        return ""
    columns = [first] if first is not None and first[0] != last[0] else []
    columns.append(last)
    head = "".join(f"<th style='text-align:left'>step {step}{' (before training)' if step == 0 else ''}</th>"
                   for step, _ in columns)
    rows = []
    for i, (prompt, _) in enumerate(last[1]):
        cells = "".join(
            f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>"
            f"{esc(answers[i][1]) if i < len(answers) else ''}</td>" for _, answers in columns)
        rows.append(f"<tr><td style='text-align:left;vertical-align:top'><b>{esc(prompt)}</b></td>{cells}</tr>")
    return (f"<table class='nbtuner-samples'><tr><th style='text-align:left'>prompt</th>{head}</tr>"
            f"{''.join(rows)}</table>")


def samples_by_step(samples: Sequence[dict[str, Any]]) -> dict[int, list[tuple[str, str]]]:
    """samples.jsonl records (step, prompt, answer) grouped by step."""
    grouped: dict[int, list[tuple[str, str]]] = {}
    for s in samples:
        grouped.setdefault(int(s["step"]), []).append((str(s["prompt"]), str(s["answer"])))
    return grouped


def comparison_html(pairs: Sequence[tuple[Any, Any]]) -> str:
    """An escaped table of (base, tuned) :class:`~nbtuner.chat.Answer` pairs."""
    rows = "".join(
        f"<tr><td style='text-align:left;vertical-align:top'><b>{esc(b.prompt)}</b></td>"
        f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>{esc(b.answer)}</td>"
        f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>{esc(t.answer)}</td></tr>"
        for b, t in pairs)
    return ("<table><tr><th style='text-align:left'>prompt</th><th style='text-align:left'>base</th>"
            f"<th style='text-align:left'>tuned</th></tr>{rows}</table>")


def png_img_tag(png: bytes, width: int = 480) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' style='width:{width}px'/>"


def kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th style='text-align:left'>{esc(str(k))}</th><td style='text-align:left'>"
                   f"{esc(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"
