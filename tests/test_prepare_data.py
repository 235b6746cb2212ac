"""prepare_data.py on small datasets in OpenThoughts3's schema written here (a .jsonl file and a save_to_disk folder):
one row per distinct prompt, drawn by seed, filtered by domain and prompt length, and a file training loads as is."""
import dataclasses
import json
import re

import pytest

from distill import config, math_data, synthetic_task
from scripts import prepare_data

DOMAINS = ("math", "code", "science")


def ot3_rows():
    """30 distinct prompts in OpenThoughts3's schema, 10 per domain, each of the math ones twice (two traces of one
    question, as OpenThoughts3 stores them), plus a row without a human turn: 41 rows."""
    rows = []
    for i in range(30):
        domain = DOMAINS[i % 3]
        for trace in range(2 if domain == "math" else 1):
            trace_text = f"<think>trace {trace}</think> \\boxed{{{2 * i}}}"
            rows.append({"conversations": [{"from": "human", "value": f"Problem {i}: what is {i}+{i}?"},
                                           {"from": "gpt", "value": trace_text}],
                         "domain": domain, "source": f"src{i % 2}", "difficulty": i % 10})
    rows.append({"conversations": [{"from": "gpt", "value": "an answer without its question"}], "domain": "math",
                 "source": "src0", "difficulty": 1})
    return rows


@pytest.fixture
def ot3_jsonl(tmp_path):
    path = tmp_path / "ot3.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ot3_rows()))
    return path


def prepare(capsys, *args):
    """prepare_data.main(args); returns its printed lines."""
    prepare_data.main(list(map(str, args)))
    return capsys.readouterr().out.strip().splitlines()


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_one_row_per_distinct_prompt_drawn_by_seed(ot3_jsonl, tmp_path, capsys):
    """Every written row is a human turn of the source with its domain, source and difficulty, no trace and no
    answer; duplicates and rows without a human turn are dropped and counted; the same seed writes the same bytes,
    another seed another draw; n = all distinct prompts writes each once."""
    lines = prepare(capsys, f"--source={ot3_jsonl}", f"--out={tmp_path / 'a.jsonl'}", "--n=12", "--seed=3")
    assert lines[0].startswith("read 41 rows from")
    assert lines[1] == "dropped: 10 exact duplicate prompts, 1 without a human turn"
    assert lines[2].startswith(f"wrote 12 prompts to {tmp_path / 'a.jsonl'}")
    rows = read_jsonl(tmp_path / "a.jsonl")
    source = {r["conversations"][0]["value"]: r for r in ot3_rows() if r["conversations"][0]["from"] == "human"}
    assert len(rows) == 12 and len({r["question"] for r in rows}) == 12
    for row in rows:
        assert set(row) == {"question", "domain", "source", "difficulty"}
        assert all(row[k] == source[row["question"]][k] for k in ("domain", "source", "difficulty"))
    prepare(capsys, f"--source={ot3_jsonl}", f"--out={tmp_path / 'b.jsonl'}", "--n=12", "--seed=3")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    prepare(capsys, f"--source={ot3_jsonl}", f"--out={tmp_path / 'c.jsonl'}", "--n=12", "--seed=4")
    assert [r["question"] for r in read_jsonl(tmp_path / "c.jsonl")] != [r["question"] for r in rows]
    prepare(capsys, f"--source={ot3_jsonl}", f"--out={tmp_path / 'all.jsonl'}", "--n=30", "--seed=0")
    assert sorted(r["question"] for r in read_jsonl(tmp_path / "all.jsonl")) == sorted(source)
    assert not list(tmp_path.glob(".tmp-*"))  # written by rename: no temporary file left


def test_the_output_folder_is_made_and_the_last_line_names_the_file(ot3_jsonl, tmp_path, capsys):
    """An --out in folders that do not exist yet is written after making them, and the last printed line names it;
    --out has no default, so no run writes a file of the repository unasked."""
    out = tmp_path / "data" / "new" / "prompts.jsonl"
    lines = prepare(capsys, f"--source={ot3_jsonl}", f"--out={out}", "--n=5")
    assert len(read_jsonl(out)) == 5 and lines[-1].startswith(f"wrote 5 prompts to {out} ")
    assert prepare_data.FLAGS["out"][1] is None


def test_domain_filter_and_too_few_prompts(ot3_jsonl, tmp_path, capsys):
    """--domain keeps that domain only, and says how many rows of other domains it dropped; asking for more prompts
    than remain stops with one line naming --n and writes nothing."""
    lines = prepare(capsys, f"--source={ot3_jsonl}", f"--out={tmp_path / 'math.jsonl'}", "--n=10", "--domain=math")
    assert lines[1] == ("dropped: 20 of other domains (--domain=math), 10 exact duplicate prompts, 1 without a human "
                        "turn")
    assert {r["domain"] for r in read_jsonl(tmp_path / "math.jsonl")} == {"math"}
    with pytest.raises(SystemExit):
        prepare_data.main([f"--source={ot3_jsonl}", f"--out={tmp_path / 'many.jsonl'}", "--n=11", "--domain=math"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --n: only 10 prompts remain"), err
    assert not (tmp_path / "many.jsonl").exists()


def char_tokenizer_folder(path):
    """A character tokenizer over printable ASCII (one token per character), saved as a folder, no chat template."""
    tokenizer = synthetic_task.char_tokenizer("".join(chr(i) for i in range(32, 127)) + "\n")
    tokenizer.save_pretrained(path)
    return tokenizer


def test_save_to_disk_folder_prompt_length_limit_and_training_loads_the_file(tmp_path, capsys):
    """From a save_to_disk folder with a tokenizer: prompts longer than max_prompt_tokens as training formats them
    (system prompt + question) are dropped and counted, the rest written; train_small's data path then loads the file
    (no answer field) with its held-out set from another dataset and drops none of its prompts."""
    from datasets import Dataset, DatasetDict
    rows = ot3_rows()
    for i, row in enumerate(rows[:8]):  # rows 0-7 (prompts 0-5, two of them twice) become 8 distinct long prompts
        row["conversations"][0]["value"] = f"Problem {i}: " + "a long statement " * 10
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(tmp_path / "ot3")
    char_tokenizer_folder(tmp_path / "tok")
    limit = len("Solve.") + 2 + len("Problem 29: what is 29+29?") + 1  # system prompt, "\n\n", question, "\n"
    out = tmp_path / "prompts.jsonl"
    lines = prepare(capsys, f"--source={tmp_path / 'ot3'}", f"--out={out}", "--n=24", f"--tokenizer={tmp_path / 'tok'}",
                    f"--max_prompt_tokens={limit}", "--system_prompt=Solve.", "--seed=1")
    # 32 distinct prompts (8 long, 24 short) in a seeded order, walked until 24 are kept: the long ones met by then
    found = re.fullmatch(rf"dropped: 8 exact duplicate prompts, 1 without a human turn, (\d+) over "
                         rf"max_prompt_tokens={limit} \(of (\d+) measured; the longest has (\d+) tokens\)", lines[1])
    assert found, lines[1]
    too_long, measured, longest = map(int, found.groups())
    assert too_long >= 1 and measured == 24 + too_long and longest == limit - 26 + len(f"Problem 0: ") + 170
    written = read_jsonl(out)
    assert len(written) == 24 and not any("long statement" in r["question"] for r in written)
    # the training path: a prompt-only file, held-out answers from eval_dataset, the same tokenizer and limit
    with open(tmp_path / "held_out.jsonl", "w") as f:
        f.writelines(json.dumps({"problem": f"{i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(4))
    cfg = dataclasses.replace(config.load_config([]), dataset=str(out), eval_dataset=str(tmp_path / "held_out.jsonl"),
                              eval_split="train", eval_question_field="problem", eval_answer_field="answer",
                              eval_size=4, system_prompt="Solve.", max_prompt_tokens=limit)
    train, held_out = math_data.load_run_splits(cfg, char_tokenizer_folder(tmp_path / "tok2"))
    assert train.column_names == ["question"] and train["question"] == [r["question"] for r in written]
    assert len(held_out) == 4
    assert "dropped" not in capsys.readouterr().out  # the file holds no prompt that training would drop


def test_bad_arguments_are_one_line(tmp_path, capsys):
    """A missing required argument, an unknown one, a bad value and a source without `conversations` each stop with
    one line naming the argument."""
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    for argv, expected in ((["--out=x.jsonl", "--n=1"], "error: --source: required"),
                           ([f"--source={tmp_path / 'gsm.jsonl'}", "--out=x", "--n=1", "--rows=2"], "error: --rows:"),
                           ([f"--source={tmp_path / 'gsm.jsonl'}", "--out=x", "--n=two"], "error: --n: expected int"),
                           ([f"--source={tmp_path / 'gsm.jsonl'}", "--out=x", "--n=1"],
                            "error: --source: no field 'conversations'")):
        with pytest.raises(SystemExit):
            prepare_data.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), (argv, err)


def test_help_lists_every_argument(capsys):
    """--help prints every argument with its type, and exits 0."""
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and all(f"--{name}={kind.__name__}" in out
                                        for name, (kind, _, _) in prepare_data.FLAGS.items())
