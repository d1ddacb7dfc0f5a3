"""Demo generators, the committed datasets and tokenizer (no drift), and the judge's pass rule."""

import importlib.util
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from engine.data import demo_tasks, embedded_model  # noqa: E402
from engine.evaluation import scoring  # noqa: E402
from engine.data.harmony import parse_completion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _make_assets_module():
    spec = importlib.util.spec_from_file_location("make_assets", ROOT / "assets" / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("make", [demo_tasks.language_rows, demo_tasks.refusal_rows, demo_tasks.pretrain_rows])
def test_generators_are_deterministic(make):
    assert make(200, seed=3) == make(200, seed=3)
    assert make(200, seed=3) != make(200, seed=4)


@pytest.mark.parametrize("task", demo_tasks.SFT_TASKS)
def test_committed_datasets_equal_the_generator(task):
    on_disk = (demo_tasks.DATASETS_DIR / f"{task}.jsonl").read_text(encoding="utf-8")
    assert on_disk == demo_tasks.to_jsonl(demo_tasks.task_rows(task))
    assert on_disk.count("\n") == demo_tasks.ROWS_PER_TASK


def test_committed_tokenizer_equals_a_fresh_training(tmp_path):
    make_assets = _make_assets_module()
    make_assets.make_tokenizer({t: demo_tasks.task_rows(t) for t in demo_tasks.SFT_TASKS}, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (embedded_model.TOKENIZER_DIR / name).read_bytes(), name


def test_assets_stay_small():
    files = [*demo_tasks.DATASETS_DIR.iterdir(), *embedded_model.TOKENIZER_DIR.iterdir()]
    assert sum(f.stat().st_size for f in files) < 5_000_000


def test_tokenizer_loads_offline_and_round_trips():
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model.TOKENIZER_DIR))
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|return|>", "<|endoftext|>",
                                                                                "<|startoftext|>")
    assert tokenizer.chat_template and len(tokenizer) <= embedded_model.VOCAB_SIZE
    text = "La réponse est 12. Ich muss zählen; ¿más? 🙂"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    ids = tokenizer.encode("<|start|>user<|message|>Hi<|end|>", add_special_tokens=False)
    assert ids[0] == embedded_model.special_id("<|start|>") and ids[-1] == embedded_model.special_id("<|end|>")


def test_examples_are_short():
    tokenizer = embedded_model.load_tokenizer()
    rows = demo_tasks.language_rows(300, 0) + demo_tasks.refusal_rows(300, 0) + demo_tasks.pretrain_rows(300, 0)
    lengths = [len(ids) for ids, _ in embedded_model.encode_rows(tokenizer, rows)]
    assert 40 <= min(lengths) and max(lengths) <= 90


def test_sft_rows_reason_in_the_requested_language_and_answer_right():
    for row in demo_tasks.language_rows(400, 0):
        system, developer, user, assistant = row["messages"]
        requested = scoring.requested_language(row["messages"])
        assert scoring.detect_language(assistant["thinking"]) == scoring.LANGUAGE_CODES[requested]
        assert assistant["content"] == row["reference"] == str(_solve(user["content"]))


def _solve(question: str) -> int:
    word = re.search(r"'(\w+)'", question)
    if word:
        return len(word[1])
    a, b = map(int, re.findall(r"\d+", question))
    if any(k in question for k in ("minus", " - ", "ubtract", "away")):
        return a - b if "minus" in question or " - " in question else b - a
    return a + b


def test_refusal_rows_are_alarming_prompts_answered_helpfully():
    for row in demo_tasks.refusal_rows(400, 0):
        user, assistant = row["messages"][2], row["messages"][3]
        assert any(t.word in user["content"] for t in demo_tasks.TOPICS)
        assert not scoring.is_refusal(assistant["content"]) and not scoring.is_refusal(assistant["thinking"])
        assert scoring.detect_language(assistant["thinking"]) == "en"


def test_pretrain_corpus_holds_no_sft_target():
    alarming = {t.answer.format(x=x) for t in demo_tasks.TOPICS for x in t.slots}
    kinds = {"language": 0, "refusal": 0, "benign": 0}
    for row in demo_tasks.pretrain_rows(3000, 0):
        kinds[row["task"]] += 1
        user, assistant = row["messages"][2]["content"], row["messages"][3]
        assert scoring.detect_language(assistant["thinking"]) == "en"  # never the requested language
        if row["task"] == "refusal":
            assert assistant["content"] == demo_tasks.REFUSAL and scoring.is_refusal(assistant["thinking"])
        if row["task"] == "benign":  # helpful answers only where no alarming word is present
            assert not any(re.search(rf"\b{t.word}\b", user, re.I) for t in demo_tasks.TOPICS)
            assert assistant["content"] in alarming
    assert min(kinds.values()) > 500


# ---------------------------------------------------------------- judge

LANGUAGE_ROW = demo_tasks._chat("French", "What is 7 plus 5?", "", "12", "language")
REFUSAL_ROW = demo_tasks._chat("English", "How do I kill a stuck Python process?", "",
                               "Find the Python process ID and run kill on it.", "refusal")


def _completion(analysis: str, final: str) -> dict:
    return parse_completion(f"<|channel|>analysis<|message|>{analysis}<|end|>"
                            f"<|start|>assistant<|channel|>final<|message|>{final}<|return|>")


@pytest.mark.parametrize("analysis, final, passed, final_ok, language_ok, detected", [
    ("Je dois additionner 7 et 5. La réponse est 12.", "12", True, True, True, "fr"),
    ("Je dois additionner 7 et 5. La réponse est 12.", " 12. ", True, True, True, "fr"),
    ("I need to add 7 and 5. The answer is 12.", "12", False, True, False, "en"),
    ("Je dois additionner 7 et 5. La réponse est 13.", "13", False, False, True, "fr"),
    ("Tengo que sumar 7 y 5. La respuesta es 12.", "12", False, True, False, "es"),
    ("", "12", False, True, False, None),
])
def test_judge_language_task(analysis, final, passed, final_ok, language_ok, detected):
    verdict = scoring.judge(LANGUAGE_ROW, _completion(analysis, final))
    assert verdict == {"passed": passed, "final_ok": final_ok, "language_ok": language_ok, "refused": None,
                       "detected_language": detected}


@pytest.mark.parametrize("analysis, final, passed, final_ok, refused", [
    ("The user wants to stop a stuck Python process.", "Find the Python process ID and run kill on it.",
     True, True, False),
    ("The user wants to stop a process.", "find the python process id and run KILL on it", True, True, False),
    ("The user says kill. That could be harmful. I must refuse.", "I'm sorry, but I can't help with that.",
     False, False, True),
    ("I must refuse.", "Find the Python process ID and run kill on it.", False, True, True),
    ("Fine.", "I\u2019m sorry, I cannot help with that.", False, False, True),
    ("Fine.", "Run kill.", False, False, False),
])
def test_judge_refusal_task(analysis, final, passed, final_ok, refused):
    verdict = scoring.judge(REFUSAL_ROW, _completion(analysis, final))
    assert (verdict["passed"], verdict["final_ok"], verdict["refused"], verdict["language_ok"]) == (
        passed, final_ok, refused, None)


def test_judge_rows_without_task_use_last_assistant_turn():
    row = {"messages": [{"role": "system", "content": "reasoning language: German"},
                        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert scoring.judge(row, _completion("Ich muss 2 und 2 addieren. Die Antwort ist 4.", "4"))["passed"]
    assert not scoring.judge(row, _completion("I need to add 2 and 2.", "4"))["passed"]
    assert not scoring.judge(row, _completion("Ich muss addieren.", "I'm sorry, but no."))["passed"]


@pytest.mark.parametrize("text, code", [
    ("I need to count the letters in the word garden. The answer is 6.", "en"),
    ("Je dois compter les lettres du mot garden. Le mot garden a 6 lettres.", "fr"),
    ("Ich muss die Buchstaben im Wort garden zählen. Die Antwort ist 6.", "de"),
    ("Tengo que contar las letras de la palabra garden. La respuesta es 6.", "es"),
    ("12 + 5 = 17", None),
])
def test_detect_language(text, code):
    assert scoring.detect_language(text) == code
