"""Measure whether a fine-tune learned an identity, and whether it started parroting it.

Two probe sets: identity questions the training data never contained (the generator holds some
phrasings back) and unrelated general questions in English and Chinese. The identity rate is the
share of identity probes whose answer contains the persona name; the leakage rate is the share of
general probes whose answer contains it. Answers are greedy, so the figures are reproducible.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

GENERAL_PROBES: dict[str, list[str]] = {
    "en": [
        "What is 7 times 8?",
        "What is the capital of France?",
        "How many days are there in a week?",
        "What color is the sky on a clear day?",
        "Write a Python function that adds two numbers.",
        "What is the boiling point of water in Celsius?",
        "Name three fruits.",
        "Translate 'thank you' into French.",
        "What is the largest planet in the solar system?",
        "Give me a tip for sleeping better.",
    ],
    "zh": [
        "三加五等于几？",
        "中国的首都是哪里？",
        "一年有几个月？",
        "水在多少摄氏度结冰？",
        "请推荐一种健康的早餐。",
        "用Python写一个计算平方的函数。",
        "太阳从哪个方向升起？",
        "请说出三种动物。",
        "怎样才能提高写作能力？",
        "地球上最大的海洋是什么？",
    ],
}


def name_in(answer: str, name: str) -> bool:
    """Case-insensitive containment; the metric both rates share."""
    return name.casefold() in answer.casefold()


def rate(answers: Sequence[str], name: str) -> float:
    return sum(name_in(a, name) for a in answers) / len(answers) if answers else 0.0


def identity_probes(languages: Sequence[str] = ("en", "zh")) -> list[str]:
    from .data import HELDOUT_IDENTITY_QUESTIONS

    return [q for lang in languages for q in HELDOUT_IDENTITY_QUESTIONS.get(lang, [])]


def general_probes(languages: Sequence[str] = ("en", "zh"), extra: Sequence[str] = ()) -> list[str]:
    return [q for lang in languages for q in GENERAL_PROBES.get(lang, [])] + list(extra)


@dataclass
class ProbeAnswer:
    prompt: str
    kind: str  # "identity" | "general"
    base: str
    tuned: str


@dataclass
class IdentityReport:
    """Before/after figures and every probe's two answers; printable, HTML and Markdown."""

    name: str
    identity_rate: float
    leakage_rate: float
    base_identity_rate: float
    base_leakage_rate: float
    probes: list[ProbeAnswer] = field(default_factory=list)
    val_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        val = f", validation loss {self.val_loss:.3f}" if self.val_loss is not None else ""
        return (f"'{self.name}': identity rate {self.base_identity_rate:.0%} -> {self.identity_rate:.0%}, "
                f"leakage rate {self.base_leakage_rate:.0%} -> {self.leakage_rate:.0%}{val}")

    def __str__(self) -> str:
        lines = [self.summary()]
        for p in self.probes:
            mark = "*" if name_in(p.tuned, self.name) else " "
            lines.append(f" {mark}[{p.kind}] {p.prompt}\n      base:  {p.base}\n      tuned: {p.tuned}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"IdentityReport({self.summary()})"

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        rows = ["| kind | prompt | base | tuned |", "|---|---|---|---|"]
        rows += [f"| {p.kind} | {cell(p.prompt)} | {cell(p.base)} | {cell(p.tuned)} |" for p in self.probes]
        return (f"# Identity report\n\n{self.summary()}\n\n- identity rate: share of identity questions not in the "
                "training data answered with the name\n- leakage rate: share of unrelated questions answered "
                "with the name\n\n" + "\n".join(rows) + "\n")

    def _repr_html_(self) -> str:
        def answer(text: str) -> str:
            style = " style='background:#fff3cd'" if name_in(text, self.name) else ""
            return f"<td{style}>{escape(text)}</td>"

        rows = "".join(f"<tr><td>{escape(p.kind)}</td><td>{escape(p.prompt)}</td>{answer(p.base)}{answer(p.tuned)}"
                       f"</tr>" for p in self.probes)
        return (f"<div><b>{escape(self.summary())}</b><table><tr><th>kind</th><th>prompt</th><th>base</th>"
                f"<th>tuned</th></tr>{rows}</table></div>")

    def save(self, folder: str | Path) -> dict[str, Path]:
        folder = Path(folder)
        paths = {"json": folder / "identity_report.json", "md": folder / "identity_report.md",
                 "html": folder / "identity_report.html"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        paths["md"].write_text(self.to_markdown(), encoding="utf-8")
        paths["html"].write_text(f"<!doctype html><meta charset='utf-8'>{self._repr_html_()}", encoding="utf-8")
        return paths


def evaluate_identity(session: Any, name: str, identity: Sequence[str] | None = None,
                      general: Sequence[str] | None = None) -> IdentityReport:
    """Asks base (adapter off) and tuned the same probes; `session` is a ChatSession with an adapter."""
    identity = list(identity) if identity is not None else identity_probes()
    general = list(general) if general is not None else general_probes()
    prompts = identity + general
    pairs = session.compare(prompts)
    kinds = ["identity"] * len(identity) + ["general"] * len(general)
    probes = [ProbeAnswer(p, k, b.answer, t.answer) for p, k, (b, t) in zip(prompts, kinds, pairs)]
    ident = [p for p in probes if p.kind == "identity"]
    gen = [p for p in probes if p.kind == "general"]
    return IdentityReport(name, rate([p.tuned for p in ident], name), rate([p.tuned for p in gen], name),
                          rate([p.base for p in ident], name), rate([p.base for p in gen], name), probes)
