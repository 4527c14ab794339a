"""Look at a dataset before spending an hour training on it.

The failures this catches are the ones that waste a run silently: a dataset that is one answer
copied thousands of times (the model parrots it on unrelated questions), samples cut off before
their answer (no trainable tokens, nothing learned), and a loss mask that misses the answer or
its end-of-turn token. One rendered sample shows exactly which tokens carry loss.
"""
from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .formats import Conversation, validate_conversation
from .tokenize import IGNORE_INDEX, TokenizedSample, tokenize_dataset

NO_LOSS_OPEN, NO_LOSS_CLOSE = "⟦", "⟧"
MARKS_LEGEND = (f"text inside {NO_LOSS_OPEN}…{NO_LOSS_CLOSE} is read by the model but carries no loss; "
                "the rest (the assistant's answers and their end-of-turn token) is what it learns to write")
_MAX_INDICES = 10
_DUPLICATE_WARN_BELOW = 0.5


@dataclass
class DataReport:
    """What :func:`check_dataset` found; printable, HTML-renderable and JSON-serialisable."""

    n_records: int
    n_unique: int
    n_duplicates: int
    duplicate_share: float
    max_repeats: int
    """How many times the most repeated record occurs (1 when there are no duplicates)."""
    file: str | None = None
    max_length: int | None = None
    tokens_min: int | None = None
    tokens_mean: float | None = None
    tokens_p95: int | None = None
    tokens_max: int | None = None
    """Token lengths before truncation."""
    n_truncated: int | None = None
    truncated_records: list[int] = field(default_factory=list)
    n_zero_trainable: int | None = None
    zero_trainable_records: list[int] = field(default_factory=list)
    """The first few record indices (0-based) with no trainable tokens."""
    trainable_tokens: int | None = None
    total_tokens: int | None = None
    sample_record: int | None = None
    sample_segments: list[tuple[str, bool]] = field(default_factory=list)
    """The rendered sample as (text, carries_loss) runs."""
    warnings: list[str] = field(default_factory=list)

    @property
    def sample_marked(self) -> str:
        """The sample as plain text with no-loss runs inside ⟦…⟧."""
        return "".join(text if trained else f"{NO_LOSS_OPEN}{text}{NO_LOSS_CLOSE}"
                       for text, trained in self.sample_segments)

    @property
    def tokenized(self) -> bool:
        return self.tokens_max is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_segments"] = [[text, trained] for text, trained in self.sample_segments]
        d["sample_marked"] = self.sample_marked if self.sample_segments else None
        return d

    def _rows(self) -> list[tuple[str, str]]:
        rows = [("records", f"{self.n_records}"),
                ("unique", f"{self.n_unique} ({self.n_duplicates} duplicates, {self.duplicate_share:.0%}; "
                           f"most repeated record appears {self.max_repeats}x)")]
        if self.tokenized:
            rows += [
                ("tokens per sample", f"min {self.tokens_min}, mean {self.tokens_mean:.1f}, "
                                      f"p95 {self.tokens_p95}, max {self.tokens_max}"),
                (f"truncated at {self.max_length}", f"{self.n_truncated}{_indices(self.truncated_records, self.n_truncated)}"),
                ("no trainable tokens", f"{self.n_zero_trainable}"
                                        f"{_indices(self.zero_trainable_records, self.n_zero_trainable)}"),
                ("trainable tokens", f"{self.trainable_tokens} of {self.total_tokens}"),
            ]
        return rows

    def __str__(self) -> str:
        head = f"Dataset check{f' of {self.file}' if self.file else ''}"
        lines = [head] + [f"  {k}: {v}" for k, v in self._rows()]
        if not self.tokenized:
            lines.append("  (no tokenizer given: token lengths and loss mask not checked)")
        for w in self.warnings:
            lines.append(f"  WARNING: {w}")
        if self.sample_segments:
            lines.append(f"  sample (record {self.sample_record}); {MARKS_LEGEND}:")
            lines += ["    " + line for line in self.sample_marked.splitlines()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        parts = [f"records={self.n_records}", f"unique={self.n_unique}"]
        if self.tokenized:
            parts += [f"tokens_p95={self.tokens_p95}", f"truncated={self.n_truncated}",
                      f"zero_trainable={self.n_zero_trainable}"]
        parts.append(f"warnings={len(self.warnings)}")
        return f"DataReport({', '.join(parts)})"

    def _repr_html_(self) -> str:
        esc = html.escape
        title = "Dataset check" + (f" of <code>{esc(self.file)}</code>" if self.file else "")
        rows = "".join(f"<tr><th style='text-align:left'>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td></tr>"
                       for k, v in self._rows())
        out = [f"<div class='nbtuner-data-report'><b>{title}</b><table>{rows}</table>"]
        if self.warnings:
            items = "".join(f"<li>{esc(w)}</li>" for w in self.warnings)
            out.append(f"<ul style='color:#b45309'>{items}</ul>")
        if self.sample_segments:
            spans = "".join(
                f"<b>{esc(text)}</b>" if trained else f"<span style='opacity:0.45'>{esc(text)}</span>"
                for text, trained in self.sample_segments)
            out.append(f"<div>Sample (record {self.sample_record}): dimmed text is read by the model but carries "
                       f"no loss; <b>bold</b> text is what it learns to write.</div>"
                       f"<pre style='white-space:pre-wrap'>{spans}</pre>")
        out.append("</div>")
        return "".join(out)


def _indices(indices: Sequence[int], count: int | None) -> str:
    if not indices:
        return ""
    more = ", …" if count is not None and count > len(indices) else ""
    return f" (records {', '.join(map(str, indices))}{more})"


def _percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile: a value that actually occurs in the data."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _segments(tokenizer: Any, sample: TokenizedSample) -> list[tuple[str, bool]]:
    runs: list[tuple[list[int], bool]] = []
    for tok, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False), trained) for ids, trained in runs]


def check_dataset(conversations: Sequence[Conversation], tokenizer: Any = None, max_length: int = 512,
                  system: str | None = None, file: str | None = None) -> DataReport:
    """Counts records and duplicates; with a tokenizer also lengths, truncation and the loss mask."""
    convs = [validate_conversation(c, file=file, record=i) for i, c in enumerate(conversations)]
    keys = [json.dumps(c, ensure_ascii=False, sort_keys=True) for c in convs]
    counts = Counter(keys)
    n, unique = len(convs), len(counts)
    report = DataReport(n_records=n, n_unique=unique, n_duplicates=n - unique,
                        duplicate_share=(n - unique) / n if n else 0.0,
                        max_repeats=max(counts.values(), default=0), file=file)
    if n == 0:
        report.warnings.append("the dataset is empty")
        return report
    if unique < _DUPLICATE_WARN_BELOW * n:
        report.warnings.append(
            f"{n} records but only {unique} unique: training repeats the same few answers, which makes the "
            "model parrot them on unrelated questions; generate varied data or dedupe")

    if tokenizer is None:
        return report
    samples = tokenize_dataset(convs, tokenizer, max_length, system=system, file=file)
    lengths = sorted(s.original_length for s in samples)
    truncated = [i for i, s in enumerate(samples) if s.truncated]
    zero = [i for i, s in enumerate(samples) if s.n_trainable == 0]
    report.max_length = max_length
    report.tokens_min, report.tokens_max = lengths[0], lengths[-1]
    report.tokens_mean = sum(lengths) / n
    report.tokens_p95 = _percentile(lengths, 95)
    report.n_truncated, report.truncated_records = len(truncated), truncated[:_MAX_INDICES]
    report.n_zero_trainable, report.zero_trainable_records = len(zero), zero[:_MAX_INDICES]
    report.trainable_tokens = sum(s.n_trainable for s in samples)
    report.total_tokens = sum(s.length for s in samples)
    if zero:
        report.warnings.append(
            f"{len(zero)} of {n} samples have no trainable tokens{_indices(zero[:_MAX_INDICES], len(zero))}: "
            + (f"their answers lie beyond max_length={max_length}, so they teach nothing; raise max_length or "
               "shorten the prompts" if all(samples[i].truncated for i in zero) else
               "the chat template leaves no assistant text in them, so they teach nothing"))
    if truncated:
        report.warnings.append(
            f"{len(truncated)} of {n} samples are longer than max_length={max_length} tokens and will be cut "
            f"(longest {lengths[-1]}){_indices(truncated[:_MAX_INDICES], len(truncated))}; an answer cut "
            "short also loses its end-of-turn token, so the model does not learn where it ends")
    report.sample_record = next((i for i, s in enumerate(samples) if s.n_trainable), 0)
    report.sample_segments = _segments(tokenizer, samples[report.sample_record])
    return report
