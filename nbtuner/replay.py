"""Replay: keep the base model's general behaviour by training on its own answers.

Before training, the base model answers a set of general prompts; those (prompt, answer) pairs
are mixed into the training data. Learning them costs the model almost nothing (they are already
its most likely answers), but every step now also rewards *not* introducing itself to unrelated
questions, which is what a parroting identity fine-tune forgets. No external dataset is needed,
so it works offline. Answers are cached per model and prompt set, so reruns start at once.

The replay prompts are deliberately different from :data:`nbtuner.evaluate.GENERAL_PROBES`:
leakage is measured on questions that training never saw.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

from .chat import GenerationSettings, answer_prompts

CACHE_VERSION = 2  # bump when the way answers are kept changes

REPLAY_PROMPTS: dict[str, list[str]] = {
    "en": [
        "What is 12 plus 15?", "What is the capital of Japan?", "How many legs does a spider have?",
        "Why is the sea salty?", "Give me a synonym for 'happy'.", "What is photosynthesis?",
        "Write a haiku about autumn.", "How do I boil an egg?", "What is the square root of 81?",
        "Name the four seasons.", "What does a thermometer measure?", "Write a Python loop that prints 1 to 5.",
        "What is the opposite of 'cold'?", "Which ocean is between Europe and America?",
        "How many minutes are in an hour?", "Suggest a name for a pet cat.", "What is a noun?",
        "Why do we need sleep?", "What is the chemical symbol for gold?", "Summarise the story of Cinderella.",
    ],
    "zh": [
        "十乘以十等于多少？", "日本的首都是哪里？", "一天有多少小时？", "为什么天空是蓝色的？", "请写一句关于春天的诗。",
        "怎么煮米饭？", "请解释什么是光合作用。", "猫和狗有什么不同？", "一周有几天？", "请推荐一本适合学生读的书。",
        "如何保持身体健康？", "长城在哪个国家？", "用Python打印“你好”。", "什么是哺乳动物？", "请列出三种颜色。",
        "月亮为什么会有圆缺？", "水是由什么组成的？", "如何学好英语？", "彩虹有几种颜色？", "请简单介绍一下熊猫。",
    ],
}


def replay_prompts(languages: Sequence[str] = ("en", "zh")) -> list[str]:
    return [p for lang in languages for p in REPLAY_PROMPTS.get(lang, [])]


def _cache_file(model_key: str, prompts: Sequence[str], system: str | None, max_new_tokens: int) -> Path:
    from .models import nbtuner_home

    key = json.dumps([CACHE_VERSION, model_key, list(prompts), system, max_new_tokens], ensure_ascii=False)
    return nbtuner_home() / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def base_answers(load_model: Callable[[], Any], tokenizer: Any, prompts: Sequence[str], *, model_key: str,
                 system: str | None = None, max_new_tokens: int = 96) -> list[list[dict[str, str]]]:
    """The base model's greedy answers as conversations. An answer cut off by the token limit is
    trimmed to its last full sentence, or dropped when too little is left: a cut-off answer
    would teach the model to stop mid-sentence. `load_model` is only called on a cache miss: an
    inference copy of the base, separate from the one being trained (on a CPU, bitsandbytes'
    fast 4-bit inference path must stay off in the training copy)."""
    cache = _cache_file(model_key, prompts, system, max_new_tokens)
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    model = load_model()
    answers = answer_prompts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=max_new_tokens), system)
    conversations = []
    for prompt, answer in zip(prompts, answers):
        if len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1:
            answer = last_full_sentence(answer)
        if answer:
            conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(conversations, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, cache)
    return conversations


def last_full_sentence(text: str, keep_at_least: float = 0.5) -> str:
    """`text` up to its last sentence end, or "" when that would keep less than half of it."""
    ends = [i for i, ch in enumerate(text) if ch in ".!?。！？\n"]
    if not ends or ends[-1] + 1 < keep_at_least * len(text):
        return ""
    return text[: ends[-1] + 1].strip()


def mix(train: list[Any], replay: list[Any], ratio: float, seed: int = 0) -> list[Any]:
    """Adds round(ratio * len(train)) replay items, cycling through them, shuffled in."""
    if ratio <= 0 or not replay:
        return list(train)
    count = round(ratio * len(train))
    extra = [replay[i % len(replay)] for i in range(count)]
    mixed = list(train) + extra
    random.Random(seed).shuffle(mixed)
    return mixed
