"""Answer checking (exact for the embedded task, math-verify for real data) and loading of the training and held-out
datasets from local folders and files written here."""
import dataclasses
import json
import threading

import pytest

from distill import config, math_data


@pytest.mark.parametrize("completion, reference", [
    ("so the answer is \\boxed{0.5}", "\\frac12"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\text{5}}", "5"),
    ("3+4=7, and 1230+4 = \\boxed{1,234}", "Natalia sold ...\n#### 1,234"),  # GSM8K gold, intermediate numbers
    ("#### 1234", "\\boxed{1234}"),
    ("\\boxed{(1,2)}", "(1, 2)"),
    ("\\boxed{x^2+2x}", "x(x+2)"),
])
def test_math_verify_accepts_equal_answers_written_differently(completion, reference):
    """math-verify counts an answer right when it equals the reference symbolically, however it is written."""
    assert math_data.is_correct(completion, reference, exact=False)


@pytest.mark.parametrize("completion, reference", [
    ("\\boxed{4}", "3"),
    ("maybe 3 apples", "3"),  # no final answer: math-verify alone would pick up the 3
    ("", "3"),
    ("\\boxed{}", "3"),
    ("\\boxed{3", "3"),  # unclosed
    ("#### 12", "#### 1,234"),
])
def test_math_verify_rejects_wrong_or_missing_answers(completion, reference):
    """A wrong value, an unclosed or missing box, or no final answer at all counts as wrong."""
    assert not math_data.is_correct(completion, reference, exact=False)


def test_a_last_box_left_open_falls_back_to_the_complete_one_before_it():
    """A completion cut inside its last \\boxed{ (max_new_tokens reached) is graded by the last complete \\boxed{}
    before it, as math-verify's own extraction reads the text; with no complete box there is no answer."""
    cut = "first \\boxed{\\frac{1}{2}}, on second thought \\boxed{\\frac{3"
    assert math_data.final_answer(cut) == "\\frac{1}{2}"
    assert math_data.is_correct(cut, "0.5", exact=False) and not math_data.is_correct(cut, "3/4", exact=False)
    assert math_data.extract_answer("\\boxed{12} then \\boxed{1") == "12"
    assert math_data.final_answer("\\boxed{3") is None and math_data.final_answer("#### 4 \\boxed{3") is None


def test_exact_mode_is_string_equality_after_normalisation():
    """The embedded task keeps exact match: 0.5 is not 1/2 there, while math-verify accepts it."""
    assert math_data.is_correct("12+5=7;#### 17", "#### 17", exact=True)
    assert not math_data.is_correct("#### 0.5", "1/2", exact=True)
    assert math_data.is_correct("#### 0.5", "1/2", exact=False)


def test_grader_errors_count_as_wrong(monkeypatch):
    """An exception inside math-verify is a wrong answer, never a crashed evaluation."""
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("parser bug")
    monkeypatch.setattr(math_verify, "verify", broken)
    assert not math_data.is_correct("\\boxed{1}", "1", exact=False)


def test_grading_works_off_the_main_thread():
    """math-verify's time limit uses SIGALRM, which only the main thread may set; elsewhere it runs without one."""
    results = []
    worker = threading.Thread(target=lambda: results.append(math_data.is_correct("\\boxed{0.5}", "\\frac12", False)))
    worker.start()
    worker.join()
    assert results == [True]


def data_config(**values):
    return dataclasses.replace(config.load_config([]), **values)


@pytest.fixture
def datasets_on_disk(tmp_path):
    """A GSM8K-like save_to_disk folder (train/test) and a MATH-500-like .jsonl with other field names."""
    from datasets import Dataset, DatasetDict
    rows = lambda n, tag: {"question": [f"{tag} {i}?" for i in range(n)], "answer": [f"#### {i}" for i in range(n)]}
    DatasetDict({"train": Dataset.from_dict(rows(10, "train")), "test": Dataset.from_dict(rows(6, "test"))}
                ).save_to_disk(tmp_path / "gsm")
    with open(tmp_path / "math500.jsonl", "w") as f:
        f.writelines(json.dumps({"problem": f"p{i}", "solution": "...", "answer": f"\\frac{{{i}}}{{2}}"}) + "\n"
                     for i in range(7))
    return tmp_path


def test_held_out_defaults_to_the_training_datasets_eval_split(datasets_on_disk):
    """Without eval_dataset the held-out rows are the first eval_size of the training dataset's eval_split."""
    train, held_out = math_data.load_splits(data_config(dataset=str(datasets_on_disk / "gsm"), eval_size=4))
    assert len(train) == 10 and held_out["question"] == [f"test {i}?" for i in range(4)]
    assert held_out.column_names == ["question", "answer"]


def test_eval_dataset_with_its_own_split_and_fields(datasets_on_disk):
    """eval_dataset replaces the held-out split; its fields are named separately; training keeps its whole split."""
    cfg = data_config(dataset=str(datasets_on_disk / "gsm"), eval_dataset=str(datasets_on_disk / "math500.jsonl"),
                      eval_split="train", eval_question_field="problem", eval_answer_field="answer", eval_size=5)
    train, held_out = math_data.load_splits(cfg)
    assert len(train) == 10 and train["question"][0] == "train 0?"
    assert held_out["question"] == [f"p{i}" for i in range(5)] and held_out["answer"][1] == "\\frac{1}{2}"


def test_training_data_needs_no_answer_field(datasets_on_disk):
    """A prompt-only training file (OpenThoughts3 has no answer field) loads with eval_dataset supplying the answers;
    the training rows carry the question only."""
    with open(datasets_on_disk / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"question": f"q{i}"}) + "\n" for i in range(5))
    cfg = data_config(dataset=str(datasets_on_disk / "prompts.jsonl"), eval_dataset=str(datasets_on_disk / "gsm"),
                      eval_split="test", eval_size=3)
    train, held_out = math_data.load_splits(cfg)
    assert train.column_names == ["question"] and train["question"] == [f"q{i}" for i in range(5)]
    assert held_out.column_names == ["question", "answer"] and len(held_out) == 3


def test_eval_fields_fall_back_to_the_training_fields(datasets_on_disk):
    """Empty eval field names mean the training dataset's fields; eval_size larger than the split keeps all."""
    cfg = data_config(dataset=str(datasets_on_disk / "gsm"), eval_dataset=str(datasets_on_disk / "gsm"),
                      eval_split="test", eval_size=100)
    assert len(math_data.load_splits(cfg)[1]) == 6


@pytest.mark.parametrize("values, expected", [
    ({"eval_dataset": "/no/such/data.jsonl"}, "error: eval_dataset: cannot load"),
    ({"eval_dataset": "MATH500", "eval_split": "test"}, "error: eval_split: split 'test' not in"),
    ({"eval_dataset": "MATH500", "eval_split": "train", "eval_question_field": "question"},
     "error: eval_dataset: no field 'question'"),
    ({"train_split": "nope"}, "error: train_split: split 'nope' not in"),
    ({"dataset": "ONE_ROW"}, "error: dataset: too few rows to hold out"),  # none left to train on
    ({"dataset": "PROMPTS_ONLY"}, "error: dataset: no field 'answer'"),  # its held-out rows need answers
])
def test_data_errors_are_one_line_naming_the_key(datasets_on_disk, capsys, values, expected):
    """A missing file, split or field, or too few rows, stops with one line that names the key."""
    files = {"MATH500": "math500.jsonl", "ONE_ROW": "one_row.jsonl", "PROMPTS_ONLY": "prompts_only.jsonl"}
    (datasets_on_disk / "one_row.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    (datasets_on_disk / "prompts_only.jsonl").write_text("".join(json.dumps({"question": f"q{i}"}) + "\n"
                                                                 for i in range(4)))
    values = {k: str(datasets_on_disk / files[v]) if v in files else v for k, v in values.items()}
    with pytest.raises(SystemExit):
        math_data.load_splits(data_config(**{"dataset": str(datasets_on_disk / "gsm"), **values}))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
