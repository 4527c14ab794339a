"""Tests for nbtuner.data: formats, identity generator, assistant-only tokenisation, checks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nbtuner.data import (HELDOUT_IDENTITY_QUESTIONS, IDENTITY_QUESTIONS, IGNORE_INDEX, DataReport,
                          check_dataset, fingerprint, identity_answer_contains, identity_conversations,
                          load_conversations, save_jsonl, save_xtuner, tokenize_conversation, tokenize_dataset)
from nbtuner.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------- import hygiene

def test_import_is_light():
    code = ("import sys, nbtuner.data; bad = [m for m in ('torch', 'transformers', 'IPython', 'ipywidgets', "
            "'matplotlib') if m in sys.modules]; print(bad)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- loading

XTUNER = [
    {"conversation": [{"system": "You are Nova.", "input": "Who are you?", "output": "I am Nova."},
                      {"input": "And your maker?", "output": "Ada made me."}]},
    {"conversation": [{"input": "你是谁？", "output": "我是Nova。"}]},
]


def test_load_xtuner_multi_turn(tmp_path):
    convs = load_conversations(write_json(tmp_path / "x.json", XTUNER))
    assert convs == [
        [S("You are Nova."), U("Who are you?"), A("I am Nova."), U("And your maker?"), A("Ada made me.")],
        [U("你是谁？"), A("我是Nova。")],
    ]


def test_xtuner_system_on_later_turn_and_empty_system(tmp_path):
    data = [{"conversation": [{"system": "", "input": "a", "output": "b"},
                              {"system": "Be terse.", "input": "c", "output": "d"}]}]
    convs = load_conversations(write_json(tmp_path / "x.json", data))
    assert convs == [[U("a"), A("b"), S("Be terse."), U("c"), A("d")]]


def test_load_alpaca(tmp_path):
    data = [{"instruction": "Translate", "input": "hello", "output": "bonjour", "system": "Translator."},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Count", "output": "1 2 3"}]
    convs = load_conversations(write_json(tmp_path / "a.json", data))
    assert convs[0] == [S("Translator."), U("Translate\n\nhello"), A("bonjour")]
    assert convs[1] == [U("Say hi"), A("hi")]
    assert convs[2] == [U("Count"), A("1 2 3")]


def test_load_openai_json_and_jsonl(tmp_path):
    recs = [{"messages": [S("sys"), U("q"), A("a")]}, {"messages": [U("q2"), A("a2"), U("q3"), A("a3")]}]
    expected = [r["messages"] for r in recs]
    assert load_conversations(write_json(tmp_path / "o.json", recs)) == expected
    assert load_conversations(write_jsonl(tmp_path / "o.jsonl", recs)) == expected
    # JSONL content under a .json name is still read line by line
    assert load_conversations(write_jsonl(tmp_path / "o2.json", recs)) == expected


def test_openai_extra_keys_dropped(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "q", "name": "bob"},
                          {"role": "assistant", "content": "a", "weight": 1}]}]
    assert load_conversations(write_jsonl(tmp_path / "o.jsonl", recs)) == [[U("q"), A("a")]]


def test_forced_format(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "i", "output": "o"}])
    assert load_conversations(path, format="Alpaca") == [[U("i"), A("o")]]
    with pytest.raises(DataError) as e:
        load_conversations(path, format="openai")
    msg = str(e.value)
    assert str(path) in msg and "record 0" in msg and "field 'messages'" in msg and "missing" in msg


def test_unknown_format_name(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "i", "output": "o"}])
    with pytest.raises(DataError, match="unknown format 'sharegpt'.*xtuner, alpaca, openai"):
        load_conversations(path, format="sharegpt")


def test_undetectable_format_names_keys(tmp_path):
    path = write_json(tmp_path / "d.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert "record 0" in str(e.value) and "question, answer" in str(e.value)


@pytest.mark.parametrize("records, record, field, reason", [
    ([{"instruction": "i", "output": "o"}, {"instruction": "i", "output": 3}], 1, "output", "must be a string"),
    ([{"instruction": "i", "output": "o"}, {"input": "x", "output": "o"}], 1, "instruction", "missing"),
    ([{"instruction": "i", "output": "  "}], 0, "output", "is empty"),
    ([{"instruction": "i", "output": "o", "system": 5}], 0, "system", "must be a string"),
    ([{"messages": [U("q"), A("a")]}, {"messages": [U("q"), {"role": "tool", "content": "x"}, A("a")]}],
     1, "messages[1].role", "'tool' is not one of system, user, assistant"),
    ([{"messages": [U("q"), {"content": "x"}]}], 0, "messages[1].role", "missing"),
    ([{"messages": [U("q"), A("")]}], 0, "messages[1].content", "is empty"),
    ([{"messages": [U("q"), {"role": "assistant", "content": ["a"]}]}], 0, "messages[1].content", "must be a string"),
    ([{"messages": [U("q"), A("a")]}, {"messages": [S("s"), U("q")]}], 1, "messages", "no assistant message"),
    ([{"messages": []}], 0, "messages", "empty list"),
    ([{"messages": "hi"}], 0, "messages", "must be a list"),
    ([{"conversation": [{"input": "q", "output": "a"}, {"input": "q2"}]}], 0, "conversation[1].output", "missing"),
    ([{"conversation": [{"input": "", "output": "a"}]}], 0, "conversation[0].input", "is empty"),
    ([{"conversation": ["q", "a"]}], 0, "conversation[0]", "must be an object"),
])
def test_bad_records_name_file_record_field(tmp_path, records, record, field, reason):
    path = write_json(tmp_path / "bad.json", records)
    with pytest.raises(DataError) as e:
        load_conversations(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: record {record}: field '{field}': ")
    assert reason in msg
    assert (e.value.file, e.value.record, e.value.field) == (str(path), record, field)


def test_record_not_an_object(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"instruction": "i", "output": "o"}, "oops"])
    with pytest.raises(DataError, match=r"record 1: must be an object, got a string"):
        load_conversations(path)


def test_jsonl_errors_give_line_numbers(tmp_path):
    good = json.dumps({"messages": [U("q"), A("a")]})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{good}\n" + json.dumps({"messages": [U("q"), A(7)]}) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert "record 2" in str(e.value) and "(line 4)" in str(e.value) and "messages[1].content" in str(e.value)

    path.write_text(f"{good}\n\n{good}\n{{\"messages\": [\n")
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert "record 2" in str(e.value) and "line 4, column" in str(e.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "i",\n   "output": "o",,}\n]\n')
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 3, column 18"):
        load_conversations(path)


def test_missing_empty_and_wrong_top_level(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        load_conversations(tmp_path / "nope.json")
    (tmp_path / "e.json").write_text("  \n")
    with pytest.raises(DataError, match=r"e\.json: the file is empty"):
        load_conversations(tmp_path / "e.json")
    with pytest.raises(DataError, match=r"l\.json: the dataset has no records"):
        load_conversations(write_json(tmp_path / "l.json", []))
    with pytest.raises(DataError, match=r"s\.json: expected a JSON list of records, got a string"):
        load_conversations(write_json(tmp_path / "s.json", "hello"))


# --------------------------------------------------------------------------- saving

def test_save_xtuner_round_trip(tmp_path):
    convs = [[S("You are Nova."), U("Who are you?"), A("I am Nova, 诺瓦."), U("More?"), A("No.")],
             [U("q"), A("a"), S("Now be terse."), U("q2"), A("a2")]]
    path = save_xtuner(convs, tmp_path / "out" / "identity.json")
    text = path.read_text(encoding="utf-8")
    assert "诺瓦" in text and '\n  {' in text  # ensure_ascii=False, indent 2
    assert json.loads(text)[0]["conversation"][0] == {"system": "You are Nova.", "input": "Who are you?",
                                                      "output": "I am Nova, 诺瓦."}
    assert load_conversations(path) == convs
    assert load_conversations(path, format="xtuner") == convs
    assert sorted(p.name for p in path.parent.iterdir()) == ["identity.json"]  # no temp files left


def test_save_xtuner_rejects_non_alternating(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(DataError) as e:
        save_xtuner([[U("q"), A("a")], [U("q"), U("again"), A("a")]], path)
    assert "record 1" in str(e.value) and "messages[1].role" in str(e.value) and "expected 'assistant'" in str(e.value)
    with pytest.raises(DataError, match="record 0.*expected 'assistant', got the end"):
        save_xtuner([[U("q"), A("a"), U("dangling")]], path)
    assert not path.exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_xtuner([[U("q"), A("old")]], tmp_path / "x.json")
    before = path.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_xtuner([[U("q"), A("new")]], path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_save_jsonl_round_trip(tmp_path):
    convs = [[S("s"), U("q"), A("a"), A("two answers in a row is fine here")], [U("你好"), A("你好！")]]
    path = save_jsonl(convs, tmp_path / "d.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "你好" in lines[1]
    assert load_conversations(path) == convs
    with pytest.raises(DataError, match=r"record 1: field 'messages\[0\].role'"):
        save_jsonl([[U("q"), A("a")], [{"role": "bot", "content": "x"}]], tmp_path / "bad.jsonl")


def test_fingerprint():
    a = [[U("q"), A("a")]]
    assert fingerprint(a) == fingerprint([[{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]])
    assert fingerprint(a) != fingerprint([[U("q"), A("b")]])
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint(a))


# --------------------------------------------------------------------------- identity

def _is_zh(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", text))


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.casefold())


def test_identity_all_pairs_distinct_and_varied():
    convs = identity_conversations("Nova")
    pairs = [(c[0]["content"], c[1]["content"]) for c in convs]
    assert len(pairs) == len(set(pairs))
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    q_en = {q for q, _ in pairs if not _is_zh(q)}
    q_zh = {q for q, _ in pairs if _is_zh(q)}
    a_en = {a for _, a in pairs if not _is_zh(a)}
    a_zh = {a for _, a in pairs if _is_zh(a)}
    assert len(q_en) >= 20 and len(q_zh) >= 20
    assert len(a_en) >= 6 and len(a_zh) >= 6
    assert len(pairs) == len(q_en) * len(a_en) + len(q_zh) * len(a_zh)  # every combination, once
    assert all(identity_answer_contains(a, "nova") for _, a in pairs)
    assert all("helpful" in a for a in a_en)  # default description


def test_identity_creator_and_description():
    with_creator = identity_conversations("Nova", model_desc="a pirate-themed assistant", creator="Ada Labs")
    answers = {c[1]["content"] for c in with_creator}
    assert all("Ada Labs" in a for a in answers)
    assert any("pirate-themed" in a for a in answers)
    assert not any("Ada" in c[1]["content"] for c in identity_conversations("Nova"))
    zh = identity_conversations("Nova", model_desc={"zh": "一个海盗助手"}, languages=("zh",))
    assert all(_is_zh(c[0]["content"]) for c in zh)
    assert any("海盗助手" in c[1]["content"] for c in zh)


def test_identity_sampling_is_deterministic_balanced_and_spread():
    a = identity_conversations("Nova", n=40, seed=1)
    assert a == identity_conversations("Nova", n=40, seed=1)
    assert a != identity_conversations("Nova", n=40, seed=2)
    assert len(a) == 40
    zh = [c for c in a if _is_zh(c[0]["content"])]
    assert len(zh) == 20
    assert len({c[0]["content"] for c in zh}) == 20  # a small sample still uses 20 different questions
    odd = identity_conversations("Nova", n=7, seed=3)
    assert len(odd) == 7 and abs(2 * sum(_is_zh(c[0]["content"]) for c in odd) - 7) == 1


def test_identity_n_larger_than_available_is_capped():
    everything = identity_conversations("Nova")
    capped = identity_conversations("Nova", n=100_000)
    assert len(capped) == len(everything)
    assert len({json.dumps(c) for c in capped}) == len(capped)


def test_heldout_questions_never_generated():
    assert all(len(HELDOUT_IDENTITY_QUESTIONS[lang]) >= 5 for lang in ("en", "zh"))
    held = {_norm(q) for qs in HELDOUT_IDENTITY_QUESTIONS.values() for q in qs}
    trained = {_norm(q) for qs in IDENTITY_QUESTIONS.values() for q in qs}
    assert not held & trained
    for seed in (0, 1):
        generated = {_norm(c[0]["content"]) for c in identity_conversations("Nova", seed=seed, creator="Ada")}
        assert generated and not generated & held


def test_identity_bad_arguments():
    with pytest.raises(ConfigError, match="name"):
        identity_conversations("  ")
    with pytest.raises(ConfigError, match="unknown language 'fr'"):
        identity_conversations("Nova", languages=("en", "fr"))
    with pytest.raises(ConfigError, match="'n' must be a positive integer"):
        identity_conversations("Nova", n=0)


def test_identity_answer_contains():
    assert identity_answer_contains("Hi, I am NOVA.", "Nova")
    assert identity_answer_contains("我是Nova。", " nova ")
    assert not identity_answer_contains("I am SmolLM.", "Nova")
    assert not identity_answer_contains("anything", "")


# --------------------------------------------------------------------------- tokenisation

def trained_runs(tok, sample) -> list[str]:
    """Decoded text of each contiguous run of tokens that carry loss."""
    runs, cur = [], []
    for tid, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == tid
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def untrained_text(tok, sample) -> str:
    return tok.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab == IGNORE_INDEX],
                      skip_special_tokens=False)


def test_labels_cover_answer_and_end_of_turn(tiny_tokenizer):
    s = tokenize_conversation(tiny_tokenizer, [U("Who are you?"), A("I am Nova.")], max_length=256)
    assert trained_runs(tiny_tokenizer, s) == ["I am Nova.<|im_end|>"]
    rest = untrained_text(tiny_tokenizer, s)
    assert "You are a tiny test assistant" in rest and "Who are you?" in rest and "Nova" not in rest
    assert rest.endswith("<|im_start|>assistant\n\n")  # header masked; the newline after <|im_end|> too
    assert not s.truncated and s.length == len(s.input_ids) == s.original_length
    assert s.n_trainable == len(tiny_tokenizer("I am Nova.<|im_end|>", add_special_tokens=False)["input_ids"])


def test_multi_turn_labels_every_answer(tiny_tokenizer):
    conv = [S("Be kind."), U("你是谁？"), A("我是Nova。"), U("And?"), A("That is all.")]
    s = tokenize_conversation(tiny_tokenizer, conv, max_length=256)
    assert trained_runs(tiny_tokenizer, s) == ["我是Nova。<|im_end|>", "That is all.<|im_end|>"]
    rest = untrained_text(tiny_tokenizer, s)
    assert "Be kind." in rest and "你是谁？" in rest and "And?" in rest
    assert "tiny test assistant" not in rest  # the template's default system prompt is replaced


def test_system_argument(tiny_tokenizer):
    s = tokenize_conversation(tiny_tokenizer, [U("q"), A("a")], 256, system="Be brief.")
    rest = untrained_text(tiny_tokenizer, s)
    assert "Be brief." in rest and "tiny test assistant" not in rest
    s2 = tokenize_conversation(tiny_tokenizer, [S("Own."), U("q"), A("a")], 256, system="Be brief.")
    assert "Be brief." not in untrained_text(tiny_tokenizer, s2)
    assert trained_runs(tiny_tokenizer, s2) == ["a<|im_end|>"]


def test_assistant_first_message(tiny_tokenizer):
    s = tokenize_conversation(tiny_tokenizer, [A("Hello there."), U("hi"), A("Bye.")], 256)
    assert trained_runs(tiny_tokenizer, s) == ["Hello there.<|im_end|>", "Bye.<|im_end|>"]


def test_repeated_text_in_user_turn_is_not_labelled(tiny_tokenizer):
    s = tokenize_conversation(tiny_tokenizer, [U("hello"), A("hello"), U("hello"), A("hello")], 256)
    assert trained_runs(tiny_tokenizer, s) == ["hello<|im_end|>", "hello<|im_end|>"]


def test_truncation(tiny_tokenizer):
    conv = [U("Who are you?"), A("I am Nova and I was made by Ada to help you.")]
    full = tokenize_conversation(tiny_tokenizer, conv, 256)
    cut = tokenize_conversation(tiny_tokenizer, conv, full.length - 3)
    assert cut.truncated and cut.length == full.length - 3 and cut.original_length == full.length
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert 0 < cut.n_trainable < full.n_trainable
    prompt_len = full.labels.index(next(lab for lab in full.labels if lab != IGNORE_INDEX))
    none_left = tokenize_conversation(tiny_tokenizer, conv, prompt_len)
    assert none_left.truncated and none_left.n_trainable == 0
    with pytest.raises(ConfigError, match="max_length"):
        tokenize_conversation(tiny_tokenizer, conv, 0)


@pytest.fixture()
def template_tokenizer(tiny_model_dir):
    """A fresh copy of the tiny tokenizer whose chat template a test may replace."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


QWEN3_LIKE = (  # earlier answers rendered plainly, the last one with an empty think block (not prefix-consistent)
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_non_prefix_consistent_template_falls_back_correctly(template_tokenizer):
    template_tokenizer.chat_template = QWEN3_LIKE
    s = tokenize_conversation(template_tokenizer, [U("q1"), A("first answer"), U("q2"), A("second answer")], 256)
    assert trained_runs(template_tokenizer, s) == ["first answer<|im_end|>", "second answer<|im_end|>"]


def test_template_that_rewrites_content_raises(template_tokenizer):
    template_tokenizer.chat_template = QWEN3_LIKE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(DataError) as e:
        tokenize_dataset([[U("q"), A("a")], [U("q1"), A("first"), U("q2"), A("second")]], template_tokenizer,
                         256, file="d.json")
    assert str(e.value).startswith("d.json: record 1: field 'messages[3].content': cannot build the loss mask")


def test_slow_tokenizer_path_matches_offsets(tiny_tokenizer):
    class Slow:
        """The tiny tokenizer without offsets, like a slow (Python) tokenizer."""
        is_fast = False

        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def __call__(self, text, **kw):
            return tiny_tokenizer(text, add_special_tokens=kw.get("add_special_tokens", True))

    conv = [U("Who are you?"), A("I am Nova."), U("你好"), A("你好！")]
    fast = tokenize_conversation(tiny_tokenizer, conv, 256)
    slow = tokenize_conversation(Slow(), conv, 256)
    assert slow.input_ids == fast.input_ids and slow.labels == fast.labels


def test_tokenize_dataset_names_file_and_record(tiny_tokenizer):
    samples = tokenize_dataset([[U("q"), A("a")]], tiny_tokenizer, 64)
    assert len(samples) == 1 and samples[0].n_trainable > 0
    with pytest.raises(DataError) as e:
        tokenize_dataset([[U("q"), A("a")], [{"role": "bot", "content": "x"}, A("a")]], tiny_tokenizer, 64,
                         file="data.jsonl")
    assert str(e.value).startswith("data.jsonl: record 1: field 'messages[0].role'")


# --------------------------------------------------------------------------- check

def test_check_counts_duplicates_and_warns():
    convs = [[U("Who are you?"), A("I am Nova.")]] * 7 + [[U("Hi"), A("Hello, I am Nova.")]] * 3
    report = check_dataset(convs)
    assert (report.n_records, report.n_unique, report.n_duplicates, report.max_repeats) == (10, 2, 8, 7)
    assert report.duplicate_share == pytest.approx(0.8)
    assert any("10 records but only 2 unique" in w and "parrot" in w for w in report.warnings)
    assert report.tokens_max is None and "no tokenizer given" in str(report)


def test_check_varied_data_has_no_warnings(tiny_tokenizer):
    report = check_dataset(identity_conversations("Nova", n=30), tiny_tokenizer, max_length=256)
    assert report.warnings == []
    assert report.n_unique == 30 and report.n_duplicates == 0
    assert report.tokens_min <= report.tokens_mean <= report.tokens_max
    assert report.tokens_min <= report.tokens_p95 <= report.tokens_max
    assert 0 < report.trainable_tokens < report.total_tokens
    assert report.n_truncated == 0 and report.n_zero_trainable == 0


def test_check_reports_zero_trainable_and_truncation(tiny_tokenizer):
    long_question = "Tell me about the capital of France. " * 40
    convs = [[U("q"), A("a")], [U(long_question), A("Paris.")], [U("q2"), A("b")]]
    report = check_dataset(convs, tiny_tokenizer, max_length=48, file="d.json")
    assert report.n_truncated == 1 and report.truncated_records == [1]
    assert report.n_zero_trainable == 1 and report.zero_trainable_records == [1]
    assert any("1 of 3 samples have no trainable tokens (records 1)" in w for w in report.warnings)
    assert any("longer than max_length=48" in w for w in report.warnings)
    assert report.tokens_max > 48
    text = str(report)
    assert "no trainable tokens: 1 (records 1)" in text and "WARNING" in text
    assert "⟦…⟧" in text  # the legend


def test_check_sample_marks_no_loss_text(tiny_tokenizer):
    report = check_dataset([[U("Who are you?"), A("I am Nova.")]], tiny_tokenizer, max_length=128)
    marked = report.sample_marked
    assert marked.startswith("⟦<|im_start|>system")
    assert "⟧I am Nova.<|im_end|>⟦" in marked
    assert re.search(r"⟦[^⟧]*Who are you\?[^⟧]*⟧", marked)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["n_records"] == 1 and data["sample_marked"] == marked
    assert "\n" not in repr(report) and repr(report).startswith("DataReport(records=1")


def test_check_html_escapes_dataset_text(tiny_tokenizer):
    evil = "<script>alert(1)</script>"
    report = check_dataset([[U(evil), A(evil)], [U(evil), A(evil)]], tiny_tokenizer, max_length=128,
                           file="<img src=x>.json")
    out = report._repr_html_()
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "<table>" in out


def test_check_validates_records():
    with pytest.raises(DataError, match=r"d\.json: record 1: field 'messages\[1\]\.content'"):
        check_dataset([[U("q"), A("a")], [U("q"), A("")]], file="d.json")


def test_report_is_a_dataclass_with_html():
    assert isinstance(check_dataset([[U("q"), A("a")]]), DataReport)
