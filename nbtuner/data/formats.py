"""Reading and writing chat datasets in the three shapes people actually have on disk.

Everything is normalised to one in-memory shape, the OpenAI messages list
(``[{"role": ..., "content": ...}, ...]``), so tokenisation, checks and chat never care where a
record came from. Validation is strict and happens at load time, because a bad record found
after twenty minutes of training costs twenty minutes; every error names the file, the record
(0-based index into the file's records) and the field, and for JSONL also the line number.

Formats:

* ``xtuner``: XTuner's conversation JSON, ``[{"conversation": [{"system"?, "input", "output"}, ...]}]``.
  A ``system`` key on a turn becomes a system message before that turn's user message.
* ``alpaca``: ``[{"instruction", "input"?, "output", "system"?}]``; instruction and a non-empty
  input are joined with a blank line into the user message.
* ``openai``: a JSON list or JSONL of ``{"messages": [{"role", "content"}, ...]}``.

Optional strings that are empty (``"input": ""`` in Alpaca data, ``"system": ""`` in XTuner
data) are treated as absent, because real datasets are full of them; required strings must not
be empty or whitespace.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DataError

Conversation = list[dict[str, str]]
"""One chat: the OpenAI messages shape, ``[{"role": "user", "content": "..."}, ...]``."""

FORMATS = ("xtuner", "alpaca", "openai")
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- reading

class _Record:
    """A parsed record plus where it came from, so errors can point at it."""

    __slots__ = ("value", "index", "line")

    def __init__(self, value: Any, index: int, line: int | None) -> None:
        self.value, self.index, self.line = value, index, line


def _where(rec: _Record) -> str:
    return f" (line {rec.line})" if rec.line is not None else ""


def _parse_jsonl(text: str, file: str) -> list[_Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}",
                            file=file, record=len(records)) from None
        records.append(_Record(value, len(records), lineno))
    return records


def _parse(path: Path, file: str) -> list[_Record]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("file not found", file=file) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a .json or .jsonl file", file=file) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", file=file) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", file=file) from None
    if not text.strip():
        raise DataError("the file is empty", file=file)
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(text, file)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Extra data"):
            # Several JSON values one after another: a JSONL file with a .json name.
            return _parse_jsonl(text, file)
        raise DataError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", file=file) from None
    if isinstance(value, dict):
        return [_Record(value, 0, None)]  # one record on its own, e.g. a one-line JSONL named .json
    if not isinstance(value, list):
        raise DataError(f"expected a JSON list of records, got {_typename(value)}", file=file)
    return [_Record(v, i, None) for i, v in enumerate(value)]


def _typename(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def detect_format(record: Any) -> str | None:
    """Guesses the format from one record's keys; None when nothing fits."""
    if not isinstance(record, dict):
        return None
    if "conversation" in record:
        return "xtuner"
    if "messages" in record:
        return "openai"
    if "instruction" in record or ("output" in record and "input" in record):
        return "alpaca"
    return None


def _required_str(rec: _Record, obj: dict, key: str, field: str, file: str) -> str:
    if key not in obj:
        raise DataError(f"missing required field{_where(rec)}", file=file, record=rec.index, field=field)
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {_typename(value)}{_where(rec)}",
                        file=file, record=rec.index, field=field)
    if not value.strip():
        raise DataError(f"is empty{_where(rec)}", file=file, record=rec.index, field=field)
    return value


def _optional_str(rec: _Record, obj: dict, key: str, field: str, file: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {_typename(value)}{_where(rec)}",
                        file=file, record=rec.index, field=field)
    return value if value.strip() else None


def _need_dict(rec: _Record, value: Any, field: str | None, file: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"must be an object, got {_typename(value)}{_where(rec)}",
                        file=file, record=rec.index, field=field)
    return value


def _need_list(rec: _Record, obj: dict, key: str, file: str) -> list:
    if key not in obj:
        raise DataError(f"missing required field (keys present: {', '.join(map(str, obj)) or 'none'}){_where(rec)}",
                        file=file, record=rec.index, field=key)
    value = obj[key]
    if not isinstance(value, list):
        raise DataError(f"must be a list, got {_typename(value)}{_where(rec)}", file=file, record=rec.index, field=key)
    if not value:
        raise DataError(f"is an empty list{_where(rec)}", file=file, record=rec.index, field=key)
    return value


def _from_xtuner(rec: _Record, file: str) -> Conversation:
    obj = _need_dict(rec, rec.value, None, file)
    turns = _need_list(rec, obj, "conversation", file)
    conv: Conversation = []
    for t, turn in enumerate(turns):
        base = f"conversation[{t}]"
        turn = _need_dict(rec, turn, base, file)
        system = _optional_str(rec, turn, "system", f"{base}.system", file)
        user = _required_str(rec, turn, "input", f"{base}.input", file)
        answer = _required_str(rec, turn, "output", f"{base}.output", file)
        if system is not None:
            conv.append({"role": "system", "content": system})
        conv.append({"role": "user", "content": user})
        conv.append({"role": "assistant", "content": answer})
    return conv


def _from_alpaca(rec: _Record, file: str) -> Conversation:
    obj = _need_dict(rec, rec.value, None, file)
    instruction = _required_str(rec, obj, "instruction", "instruction", file)
    extra = _optional_str(rec, obj, "input", "input", file)
    answer = _required_str(rec, obj, "output", "output", file)
    system = _optional_str(rec, obj, "system", "system", file)
    conv: Conversation = []
    if system is not None:
        conv.append({"role": "system", "content": system})
    conv.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra is not None else instruction})
    conv.append({"role": "assistant", "content": answer})
    return conv


def _from_openai(rec: _Record, file: str) -> Conversation:
    obj = _need_dict(rec, rec.value, None, file)
    messages = _need_list(rec, obj, "messages", file)
    return _check_messages(rec, messages, file, prefix="messages")


def _check_messages(rec: _Record, messages: Sequence[Any], file: str, prefix: str) -> Conversation:
    conv: Conversation = []
    for m, msg in enumerate(messages):
        base = f"{prefix}[{m}]"
        msg = _need_dict(rec, msg, base, file)
        role = msg.get("role")
        if role not in ROLES:
            shown = "missing" if "role" not in msg else f"{role!r} is not one of {', '.join(ROLES)}"
            raise DataError(f"role {shown}{_where(rec)}", file=file, record=rec.index, field=f"{base}.role")
        content = _required_str(rec, msg, "content", f"{base}.content", file)
        conv.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in conv):
        raise DataError(f"no assistant message, so there is nothing to learn{_where(rec)}",
                        file=file, record=rec.index, field=prefix)
    return conv


_READERS = {"xtuner": _from_xtuner, "alpaca": _from_alpaca, "openai": _from_openai}


def load_conversations(path: str | os.PathLike[str], format: str | None = None) -> list[Conversation]:
    """Loads a dataset file into conversations, validating every record.

    ``format`` is one of ``FORMATS`` or None to detect it from the first record's keys.
    Raises :class:`DataError` naming the file, record and field for anything unusable.
    """
    path = Path(path)
    file = str(path)
    if format is not None:
        fmt = str(format).strip().lower()
        if fmt not in _READERS:
            raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)} "
                            "(or None to detect it)", file=file, field="format")
    records = _parse(path, file)
    if not records:
        raise DataError("the dataset has no records", file=file)
    if format is None:
        first = records[0]
        fmt = detect_format(first.value)
        if fmt is None:
            keys = ", ".join(map(str, first.value)) if isinstance(first.value, dict) else _typename(first.value)
            raise DataError(f"cannot tell the format from this record ({keys}){_where(first)}; expected "
                            "'conversation' (xtuner), 'instruction'/'output' (alpaca) or 'messages' (openai)",
                            file=file, record=0)
    reader = _READERS[fmt]
    return [reader(rec, file) for rec in records]


def validate_conversation(messages: Any, *, file: str | None = None, record: int | None = None) -> Conversation:
    """Checks one in-memory conversation (roles, non-empty string contents, an assistant turn).

    Returns a clean copy holding only ``role`` and ``content``; raises :class:`DataError`.
    """
    rec = _Record(messages, record if record is not None else 0, None)
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"a conversation must be a list of messages, got {_typename(messages)}",
                        file=file, record=record)
    if not messages:
        raise DataError("the conversation is empty", file=file, record=record, field="messages")
    try:
        return _check_messages(rec, messages, file, prefix="messages")  # type: ignore[arg-type]
    except DataError as e:
        raise DataError(e.reason, file=file, record=record, field=e.field) from None


# --------------------------------------------------------------------------- writing

def _atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it over `path`.

    A crash or a full disk mid-write leaves the old file intact instead of half a JSON file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # mkstemp makes 0600 files; keep an existing file's mode, else a normal 0644
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def to_xtuner_record(conversation: Conversation, *, file: str | None = None, record: int | None = None) -> dict:
    """Converts one conversation to an XTuner record; DataError if it has no XTuner shape.

    XTuner stores (optional system, user, assistant) turns, so the messages must follow that
    pattern exactly and end with an assistant answer.
    """
    conv = validate_conversation(conversation, file=file, record=record)
    turns: list[dict[str, str]] = []
    i = 0
    while i < len(conv):
        turn: dict[str, str] = {}
        if conv[i]["role"] == "system":
            turn["system"] = conv[i]["content"]
            i += 1
        for key, role in (("input", "user"), ("output", "assistant")):
            if i >= len(conv) or conv[i]["role"] != role:
                got = f"'{conv[i]['role']}'" if i < len(conv) else "the end of the conversation"
                raise DataError(f"XTuner format needs (system?, user, assistant) turns: expected '{role}', "
                                f"got {got}", file=file, record=record,
                                field=f"messages[{min(i, len(conv) - 1)}].role")
            turn[key] = conv[i]["content"]
            i += 1
        turns.append(turn)
    return {"conversation": turns}


def save_xtuner(conversations: Iterable[Conversation], path: str | os.PathLike[str]) -> Path:
    """Writes XTuner conversation JSON (UTF-8, indent 2) atomically; returns the path."""
    path = Path(path)
    records = [to_xtuner_record(c, file=str(path), record=i) for i, c in enumerate(conversations)]
    _atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=2) + "\n")
    return path


def save_jsonl(conversations: Iterable[Conversation], path: str | os.PathLike[str]) -> Path:
    """Writes OpenAI messages JSONL (one ``{"messages": [...]}`` per line) atomically."""
    path = Path(path)
    lines = [json.dumps({"messages": validate_conversation(c, file=str(path), record=i)}, ensure_ascii=False)
             for i, c in enumerate(conversations)]
    _atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def fingerprint(conversations: Iterable[Conversation]) -> str:
    """SHA-256 of the canonical JSON of the conversations, for the run record.

    Two runs with the same fingerprint trained on the same data, whatever file format or key
    order it was stored in.
    """
    canon = json.dumps([[{"role": m["role"], "content": m["content"]} for m in c] for c in conversations],
                       ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()
