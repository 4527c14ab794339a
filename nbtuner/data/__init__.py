"""Chat datasets: load and save the common formats, generate identity data, tokenise with
assistant-only labels, and check a dataset before training on it.

UI-free and light: importing this package does not import torch or transformers; only the
tokenisation functions touch a tokenizer, which the caller passes in.
"""
from __future__ import annotations

from .check import DataReport, check_dataset
from .formats import (FORMATS, Conversation, detect_format, fingerprint, load_conversations, save_jsonl,
                      save_xtuner, validate_conversation)
from .identity import (HELDOUT_IDENTITY_QUESTIONS, IDENTITY_QUESTIONS, PERSONA_SIDECAR, identity_answer_contains,
                       identity_conversations, write_identity_dataset)
from .tokenize import IGNORE_INDEX, TokenizedSample, assistant_spans, tokenize_conversation, tokenize_dataset

__all__ = [
    "Conversation", "FORMATS", "load_conversations", "detect_format", "validate_conversation", "save_xtuner",
    "save_jsonl", "fingerprint",
    "identity_conversations", "identity_answer_contains", "write_identity_dataset", "PERSONA_SIDECAR", "IDENTITY_QUESTIONS", "HELDOUT_IDENTITY_QUESTIONS",
    "TokenizedSample", "IGNORE_INDEX", "tokenize_conversation", "tokenize_dataset", "assistant_spans",
    "DataReport", "check_dataset",
]
