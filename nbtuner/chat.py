"""Chat generation through the model's own chat template, and base-versus-tuned comparison.

One base model stays in memory: the tuned answer comes from the adapter, the base answer from
the same weights with the adapter disabled. Greedy decoding is the default so before/after
comparisons are reproducible.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .models import ResolvedModel, describe, load_model, load_tokenizer, resolve_model


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature and self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                    "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty}


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """End-of-turn and end-of-text ids; chat templates often end a turn with a token that is not eos."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(value)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    return sorted(set(ids))


def build_messages(prompt: str, history: Iterable[tuple[str, str]] = (), system: str | None = None
                   ) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": prompt})
    return messages


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    from transformers import TextStreamer

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(model: Any, tokenizer: Any, messages_batch: list[list[dict[str, str]]],
             settings: GenerationSettings | None = None, on_text: Callable[[str], None] | None = None
             ) -> list[str]:
    """Answers a batch of conversations (left-padded); streams text when there is one conversation."""
    import torch

    settings = settings or GenerationSettings()
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_batch]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    streamer = _streamer(tokenizer, on_text) if on_text is not None and len(texts) == 1 else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model.generate(**enc, **settings.generate_kwargs(), use_cache=True,  # training turns it off
                                 eos_token_id=stop_token_ids(tokenizer, model),
                                 pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    finally:
        if was_training:
            model.train()
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


ANSWER_BATCH = 64  # measured on 2 CPU cores: 40 replay prompts took 129 s in batches of 8, 39 s in one


def answer_prompts(model: Any, tokenizer: Any, prompts: Iterable[str], settings: GenerationSettings | None = None,
                   system: str | None = None, batch_size: int = ANSWER_BATCH) -> list[str]:
    """Single-turn answers to many prompts. Generation pays per new token, not per sequence, so
    big batches are what make probes and replay cheap; batch_size only bounds the memory."""
    prompts = list(prompts)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [build_messages(p, (), system) for p in prompts[start:start + batch_size]]
        answers += generate(model, tokenizer, chunk, settings)
    return answers


@dataclass
class Answer:
    prompt: str
    model: str  # "base" or "tuned"
    answer: str

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "model": self.model, "answer": self.answer}


@dataclass
class ChatSession:
    """A loaded model (optionally with an adapter) plus history; what `%chat` and `nbtuner chat` drive."""

    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    adapter: str | None = None
    system: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None

    def card(self) -> Any:
        return describe(self.model, self.tokenizer, self.resolved, self.adapter)

    @contextlib.contextmanager
    def _variant(self, which: str) -> Iterator[None]:
        if which == "base" and self.has_adapter:
            with self.model.disable_adapter():
                yield
        elif which == "tuned" and not self.has_adapter:
            raise ValueError("no adapter is loaded, so there is no tuned model to ask")
        else:
            yield

    def ask(self, prompt: str, *, which: str | None = None, remember: bool = True,
            on_text: Callable[[str], None] | None = None) -> str:
        which = which or ("tuned" if self.has_adapter else "base")
        messages = build_messages(prompt, self.history, self.system)
        with self._variant(which):
            answer = generate(self.model, self.tokenizer, [messages], self.settings, on_text)[0]
        if remember:
            self.history.append((prompt, answer))
        return answer

    def answer_all(self, prompts: list[str], which: str | None = None) -> list[Answer]:
        """Single-turn answers to many prompts in one batch (no history)."""
        which = which or ("tuned" if self.has_adapter else "base")
        with self._variant(which):
            answers = answer_prompts(self.model, self.tokenizer, prompts, self.settings, self.system)
        return [Answer(p, which, a) for p, a in zip(prompts, answers)]

    def compare(self, prompts: list[str]) -> list[tuple[Answer, Answer]]:
        """The same prompts to base and tuned, one base model in memory."""
        base = self.answer_all(prompts, "base")
        tuned = self.answer_all(prompts, "tuned")
        return list(zip(base, tuned))

    def clear(self) -> None:
        self.history.clear()


def open_chat(model: str | None = None, adapter: str | None = None, *, system: str | None = None,
              settings: GenerationSettings | None = None, trust_remote_code: bool = False,
              quantize_4bit: bool | None = None) -> ChatSession:
    """Loads a base model (and adapter) for chatting. A QLoRA adapter is served on a 4-bit base,
    the weights it was trained against."""
    resolved = resolve_model(model)
    from .export import adapter_metadata

    meta = adapter_metadata(adapter)
    if quantize_4bit is None:
        quantize_4bit = meta.get("method") == "qlora"
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    base = load_model(resolved, quantize_4bit=quantize_4bit, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, adapter)
    base.eval()
    return ChatSession(base, tokenizer, resolved, str(adapter) if adapter else None, system,
                       settings or GenerationSettings())

