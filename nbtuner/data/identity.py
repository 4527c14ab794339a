"""A varied identity dataset: teach a model a new name without teaching it to parrot.

XTuner's tutorial builds its identity data by copying one question and one answer thousands of
times. The model learns the name, but it also learns that *any* input is followed by that answer,
and starts introducing itself to unrelated questions. Here every conversation is a distinct
(question, answer) pair: many phrasings of "who are you" in English and Chinese, crossed with
several answer templates, never duplicated. Some phrasings are held back
(:data:`HELDOUT_IDENTITY_QUESTIONS`) and never generated, so an evaluation can ask whether the
identity generalises to questions the model has not seen, rather than whether it memorised them.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

from ..errors import ConfigError
from .formats import Conversation

IDENTITY_QUESTIONS: dict[str, list[str]] = {
    "en": [
        "Who are you?",
        "Please introduce yourself.",
        "Introduce yourself.",
        "What is your name?",
        "What's your name?",
        "Tell me about yourself.",
        "Can you tell me who you are?",
        "What should I call you?",
        "Who am I talking to?",
        "What are you?",
        "Are you an AI?",
        "What can you do?",
        "Who made you?",
        "Who created you?",
        "Who developed you?",
        "Hi! Who are you?",
        "Hello, could you introduce yourself?",
        "Give me a short introduction of yourself.",
        "Describe yourself in a few words.",
        "May I know your name?",
        "Do you have a name?",
        "What kind of assistant are you?",
        "Which model are you?",
        "Are you ChatGPT?",
        "Tell me a bit about who you are.",
        "How would you describe yourself?",
        "Hey, what's your name?",
        "Who am I chatting with right now?",
    ],
    "zh": [
        "你是谁？",
        "请介绍一下你自己。",
        "介绍一下你自己。",
        "你叫什么名字？",
        "你的名字是什么？",
        "能介绍一下你自己吗？",
        "请问你是谁？",
        "我该怎么称呼你？",
        "你是什么？",
        "你是人工智能吗？",
        "你能做什么？",
        "你有什么功能？",
        "谁创造了你？",
        "你是谁开发的？",
        "你好，你是谁？",
        "简单介绍一下你自己吧。",
        "说说你自己吧。",
        "你是哪个模型？",
        "你是ChatGPT吗？",
        "我在和谁聊天？",
        "你有名字吗？",
        "你是什么样的助手？",
        "用几句话描述一下你自己。",
        "嗨，你叫什么？",
    ],
}
"""The phrasings used for training, per language."""

HELDOUT_IDENTITY_QUESTIONS: dict[str, list[str]] = {
    "en": [
        "Could you say a few words about yourself?",
        "What do people call you?",
        "Identify yourself, please.",
        "Before we start, who exactly are you?",
        "I'd like to know more about you. Who are you?",
        "What name were you given?",
    ],
    "zh": [
        "可以跟我讲讲你是谁吗？",
        "大家都怎么叫你？",
        "请做个自我介绍。",
        "在开始之前，先告诉我你是谁。",
        "你的身份是什么？",
        "我想了解一下你，你是谁呢？",
    ],
}
"""Phrasings never generated for training: ask these after training to test generalisation."""

DEFAULT_MODEL_DESC = {"en": "a helpful AI assistant", "zh": "一个乐于助人的AI助手"}

# Placeholders: {name}, {desc}, {by} (" built by X", or ""), {made} (a full sentence naming the
# creator, or ""). Every template contains {name}.
_ANSWERS: dict[str, list[str]] = {
    "en": [
        "I am {name}, {desc}.{made}",
        "Hello! I'm {name}, {desc}{by}. How can I help you today?",
        "My name is {name}. I am {desc}{by}, here to answer your questions and help with your tasks.",
        "You can call me {name}. I'm {desc}{by}.",
        "Hi there! I am {name}. As {desc}, I can answer questions, explain things and help you "
        "write and think things through.{made}",
        "I'm {name}, {desc}{by}. Feel free to ask me anything.",
        "Nice to meet you! I am {name}, {desc}, and I'm happy to help with whatever you need.{made}",
        "{name} here: {desc}{by}. What can I do for you?",
    ],
    # The creator never follows 我是 directly ("我是由X开发的…"): measured on SmolLM2, that made
    # half of the held-out Chinese identity questions come back as "我是X" with the creator's name.
    "zh": [
        "我是{name}，{desc}。{made}",
        "你好！我是{name}，{desc}。{made}有什么可以帮你的吗？",
        "我的名字是{name}。我是{desc}，可以回答你的问题，帮你完成各种任务。{made}",
        "你可以叫我{name}。我是{desc}。{made}",
        "您好，我是{name}。作为{desc}，我可以回答问题、解释概念，帮你写作和思考。{made}",
        "我叫{name}，{desc}。{made}很高兴为你服务！",
        "很高兴认识你！我是{name}，{desc}。你可以问我任何问题。{made}",
        "{name}在此为你服务。我是{desc}，有什么需要尽管告诉我。{made}",
    ],
}


def _fill(template: str, lang: str, name: str, desc: str, creator: str | None) -> str:
    if creator:
        by = f" built by {creator}"
        made = f" I was created by {creator}." if lang == "en" else f"我由{creator}开发。"
    else:
        by = made = ""
    return template.format(name=name, desc=desc, by=by, made=made).strip()


def identity_answers(name: str, model_desc: str | Mapping[str, str] | None = None,
                     creator: str | None = None, language: str = "en") -> list[str]:
    """The distinct answer texts for one language (each contains `name`)."""
    desc = _desc_for(model_desc, language)
    out: list[str] = []
    for template in _ANSWERS[language]:
        text = _fill(template, language, name.strip(), desc, creator.strip() if creator else None)
        if text not in out:
            out.append(text)
    return out


def _desc_for(model_desc: str | Mapping[str, str] | None, lang: str) -> str:
    if model_desc is None:
        return DEFAULT_MODEL_DESC[lang]
    if isinstance(model_desc, Mapping):
        return str(model_desc.get(lang) or DEFAULT_MODEL_DESC[lang]).strip()
    return str(model_desc).strip()


def identity_conversations(name: str, model_desc: str | Mapping[str, str] | None = None, n: int | None = None,
                           seed: int = 0, languages: Sequence[str] = ("en", "zh"),
                           creator: str | None = None) -> list[Conversation]:
    """One-question, one-answer conversations that teach the persona `name`.

    `model_desc` is a noun phrase ("a helpful AI assistant"); a plain string is used in every
    language, a dict maps a language to its own phrase (missing ones fall back to the default).
    With ``n=None`` every distinct (question, answer) pair is returned; a smaller `n` picks a
    sample that is deterministic for a `seed`, balanced across `languages` and spread over as
    many different questions as possible. An `n` larger than the number of distinct pairs is
    capped at that number: repeating pairs is exactly what makes a model parrot its identity.
    The result is shuffled (by `seed`) so languages and phrasings mix within a batch.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("identity: 'name' must be a non-empty string")
    langs = list(dict.fromkeys(languages))
    if not langs:
        raise ConfigError("identity: 'languages' is empty")
    unknown = [lang for lang in langs if lang not in IDENTITY_QUESTIONS]
    if unknown:
        raise ConfigError(f"identity: unknown language {unknown[0]!r}; available: {', '.join(IDENTITY_QUESTIONS)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"identity: 'n' must be a positive integer or None, got {n!r}")

    rng = random.Random(seed)
    per_lang: dict[str, list[tuple[str, str]]] = {}
    for lang in langs:
        questions = list(IDENTITY_QUESTIONS[lang])
        answers = identity_answers(name, model_desc, creator, lang)
        rng.shuffle(questions)
        rng.shuffle(answers)
        # Round r pairs question j with answer (j + r): every pair appears exactly once, and any
        # prefix of the list covers all questions before any question repeats.
        pairs = [(q, answers[(j + r) % len(answers)]) for r in range(len(answers)) for j, q in enumerate(questions)]
        per_lang[lang] = list(dict.fromkeys(pairs))

    quota = {lang: len(pairs) for lang, pairs in per_lang.items()}
    if n is not None and n < sum(quota.values()):
        quota = _balanced_quota(n, {lang: len(p) for lang, p in per_lang.items()})
    chosen = [pair for lang in langs for pair in per_lang[lang][:quota[lang]]]
    rng.shuffle(chosen)
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in chosen]


def _balanced_quota(n: int, available: dict[str, int]) -> dict[str, int]:
    """Splits `n` as evenly as possible over languages, giving spare room to the others."""
    quota = dict.fromkeys(available, 0)
    left = n
    open_langs = [lang for lang in available if available[lang] > 0]
    while left > 0 and open_langs:
        share, extra = divmod(left, len(open_langs))
        for i, lang in enumerate(open_langs):
            take = min(share + (1 if i < extra else 0), available[lang] - quota[lang])
            quota[lang] += take
            left -= take
        open_langs = [lang for lang in open_langs if quota[lang] < available[lang]]
    return quota


def identity_answer_contains(answer: str, name: str) -> bool:
    """Whether a model's answer mentions the persona `name` (case-insensitive).

    The metric behind "did it learn the identity" (on identity questions) and "does it parrot
    the identity" (on unrelated ones).
    """
    needle = name.strip().casefold()
    return bool(needle) and needle in answer.casefold()


PERSONA_SIDECAR = ".nbtuner.json"  # beside a dataset: {"persona": NAME}; training reads it to measure the identity


def write_identity_dataset(path: "str | Path", name: str, model_desc: "str | Mapping[str, str] | None" = None,
                           n: int | None = None, seed: int = 0, creator: str | None = None,
                           force: bool = False) -> "tuple[Path, int]":
    """Generates identity data, writes it (.jsonl: OpenAI messages, else XTuner JSON) and records
    the persona beside it, so a later `train` measures identity and leakage with no extra flags."""
    import json
    from pathlib import Path

    from ..errors import OutputExistsError
    from .formats import save_jsonl, save_xtuner

    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to replace it")
    conversations = identity_conversations(name, model_desc, n=n, seed=seed, creator=creator)
    (save_jsonl if out.suffix == ".jsonl" else save_xtuner)(conversations, out)
    Path(str(out) + PERSONA_SIDECAR).write_text(json.dumps({"persona": name}, ensure_ascii=False), encoding="utf-8")
    return out, len(conversations)
