"""Tokenise conversations with the tokenizer's own chat template and assistant-only labels.

Two things decide whether a chat fine-tune works, and both live here:

* The text is rendered by the tokenizer's chat template, the same one chat uses at inference.
  A hand-written template that differs by one newline is the classic cause of "the tuned model
  rambles".
* The loss covers every assistant answer *and the end-of-turn token after it* (``<|im_end|>``
  for ChatML). If the end-of-turn token is masked the model never learns to stop. Everything
  else (system prompt, user turns, role headers, the template's default system prompt) gets
  label -100.

How the assistant text is found: for assistant message i, its span runs from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])``
(trailing whitespace after the end-of-turn token excluded), provided each rendering is a
prefix of the next, which holds for ChatML, Llama 3, Mistral and most templates. Templates that
rewrite history (e.g. dropping reasoning from earlier turns) fail that check; then each message
is located verbatim in the rendered text, searching backwards, and an assistant span must end in
a special token. If neither works a :class:`DataError` says so instead of silently mislabelling.
Tokens are labelled when their first character lies inside an assistant span.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import ConfigError, DataError, ModelError
from .formats import Conversation, validate_conversation

IGNORE_INDEX = -100
"""Label value for tokens that carry no loss (PyTorch's cross-entropy ``ignore_index``)."""


@dataclass
class TokenizedSample:
    """One conversation ready for training: token ids and labels of equal length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    original_length: int = field(default=-1)
    """Token count before truncation (equals `length` when not truncated)."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")
        if self.original_length < 0:
            self.original_length = len(self.input_ids)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_trainable(self) -> int:
        """Tokens that carry loss; zero means the sample teaches nothing."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # some versions wrap a single rendering in a list
        text = text[0]
    return text


def _special_tokens(tokenizer: Any) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        tokens.update(tokenizer.get_added_vocab())
    except Exception:  # noqa: BLE001 - not every tokenizer class implements it
        pass
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _prefix_spans(tokenizer: Any, msgs: Conversation, full: str) -> list[tuple[int, int]] | None:
    """Assistant spans from prefix renderings; None when the template is not prefix-consistent."""
    spans = []
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        if i == 0:
            return None  # nothing to render before it; some templates refuse an empty list
        try:
            before = _render(tokenizer, msgs[:i], add_generation_prompt=True)
            upto = _render(tokenizer, msgs[:i + 1])
        except Exception:  # noqa: BLE001 - a template may reject a partial conversation
            return None
        if not (full.startswith(upto) and upto.startswith(before)):
            return None
        start, chunk = len(before), upto[len(before):]
        keep = len(chunk.rstrip())
        if chunk.startswith(msg["content"]):
            keep = max(keep, len(msg["content"]))  # content may itself end in whitespace
        if keep == 0 or (spans and start < spans[-1][1]):
            return None
        spans.append((start, start + keep))
    return spans


def _search_spans(tokenizer: Any, msgs: Conversation, full: str) -> list[tuple[int, int]]:
    """Locates every message verbatim, last to first, so a default system prompt cannot match."""
    specials = _special_tokens(tokenizer)
    bound = len(full)
    spans: dict[int, tuple[int, int]] = {}
    for i in range(len(msgs) - 1, -1, -1):
        content, role = msgs[i]["content"], msgs[i]["role"]
        found = None
        for needle in dict.fromkeys((content, content.strip())):
            hi = bound
            while found is None:
                pos = full.rfind(needle, 0, hi)
                if pos < 0:
                    break
                end = pos + len(needle)
                eot = next((t for t in specials if full.startswith(t, end)), None)
                if role != "assistant":
                    found = (pos, end)
                elif eot is not None:
                    found = (pos, end + len(eot))
                else:
                    hi = end - 1
            if found:
                break
        if found is None:
            if role == "assistant":
                why = ("the chat template renders history differently from the last turn, and this "
                       "answer cannot be found verbatim followed by an end-of-turn token")
            else:
                why = "the chat template changes this message's text, so assistant tokens cannot be located"
            raise DataError(f"cannot build the loss mask: {why}", field=f"messages[{i}].content")
        if role == "assistant":
            spans[i] = found
        bound = found[0]
    return [spans[i] for i in sorted(spans)]


def assistant_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Renders `messages` and returns the text plus the character spans that carry loss."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template, so conversations cannot be rendered the way "
                         "the model will see them in chat; use an instruct/chat model or set "
                         "tokenizer.chat_template")
    try:
        full = _render(tokenizer, messages)
    except Exception as e:  # noqa: BLE001 - jinja's raise_exception() and friends
        raise DataError(f"the chat template rejected this conversation: {e}", field="messages") from None
    spans = _prefix_spans(tokenizer, messages, full)
    if spans is None:
        spans = _search_spans(tokenizer, messages, full)
    return full, spans


def _tokenize_labelled(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        k = 0
        for tok, (start, _end) in zip(ids, enc["offset_mapping"]):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            inside = k < len(spans) and spans[k][0] <= start < spans[k][1]
            labels.append(tok if inside else IGNORE_INDEX)
        return ids, labels
    # Slow tokenizers have no offsets: tokenise the pieces between span boundaries separately.
    ids, labels, pos = [], [], 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, trained in ((text[pos:start], False), (text[start:end], True)):
            if piece:
                piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                ids += piece_ids
                labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        pos = end
    return ids, labels


def with_system(messages: Conversation, system: str | None) -> Conversation:
    """Prepends a system message when `system` is given and the conversation has none."""
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def tokenize_conversation(tokenizer: Any, messages: Conversation, max_length: int,
                          system: str | None = None) -> TokenizedSample:
    """Tokenises one conversation with assistant-only labels, truncated to `max_length` tokens.

    Truncation keeps the beginning (the prompt the answers depend on); a sample cut before its
    first answer has no trainable tokens, which :func:`nbtuner.data.check_dataset` reports.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    msgs = with_system(validate_conversation(messages), system)
    text, spans = assistant_spans(tokenizer, msgs)
    ids, labels = _tokenize_labelled(tokenizer, text, spans)
    full = len(ids)
    return TokenizedSample(ids[:max_length], labels[:max_length], truncated=full > max_length, original_length=full)


def tokenize_dataset(conversations: Iterable[Conversation], tokenizer: Any, max_length: int,
                     system: str | None = None, file: str | None = None) -> list[TokenizedSample]:
    """Tokenises every conversation; a DataError names `file` and the record index."""
    out = []
    for i, conv in enumerate(conversations):
        try:
            out.append(tokenize_conversation(tokenizer, conv, max_length, system=system))
        except DataError as e:
            raise DataError(e.reason, file=file if file is not None else e.file, record=i, field=e.field) from None
    return out
