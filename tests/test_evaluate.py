"""evaluate.py offline: local datasets in each paper benchmark's real field schema (written here, a+b problems), a model
whose answers are known (the embedded task's teacher, trained on 1-digit sums) against a random one, a run's
checkpoints of both scripts' formats, resume after an interruption, and one-line errors."""
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from distill import checkpoints, synthetic_task
from scripts import evaluate

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread while this module runs: tiny models on a shared 2-core CPU run slower on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_model(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """teacher/: the embedded task's Qwen3 trained by SFT on 1-digit sums until its samples at temperature 1 are right
    (300 steps, seconds); random/: an untrained one of the same shape. Both with the character tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = synthetic_task.char_tokenizer()
    rng = random.Random(0)
    rows = [synthetic_task.make_problem(rng, 1) for _ in range(2000)]
    teacher = synthetic_task.tiny_qwen3(tokenizer, 1, 64, seed=0)
    synthetic_task.sft(teacher, tokenizer, rows, 300, 0.01, 32, 0, desc="teacher sft")
    save_model(teacher, tokenizer, root / "teacher")
    save_model(synthetic_task.tiny_qwen3(tokenizer, 1, 64, seed=7), tokenizer, root / "random")
    return root


def sums(seed):
    """PROBLEMS 1-digit a+b problems: (question 'a+b=', the sum)."""
    rng = random.Random(seed)
    return [(f"{a}+{b}=", a + b) for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(PROBLEMS))]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def benchmark_data(tmp_path_factory):
    """The a+b problems in each benchmark's own schema, as the hub stores it: GSM8K a save_to_disk folder with train and
    test splits and '#### n' solutions; MATH-500 a .jsonl with LaTeX answers (\\frac{2s}{2}); OlympiadBench a folder
    with a train split and final_answer a list ['$s$']; AMC float answers; AIME24 integer `Answer` under capitalised
    names; AIME25 string answers. Returns {benchmark key: path}."""
    from datasets import Dataset, DatasetDict
    root = tmp_path_factory.mktemp("benchmarks")
    gsm = lambda seed: Dataset.from_list([{"question": q, "answer": f"Add {q[:-1]}.\n#### {s}"} for q, s in sums(seed)])
    DatasetDict({"train": gsm(10), "test": gsm(1)}).save_to_disk(root / "gsm8k")
    write_jsonl(root / "math500.jsonl", [{"problem": q, "solution": f"$\\boxed{{{s}}}$",
                                          "answer": f"\\frac{{{2 * s}}}{{2}}", "subject": "Algebra", "level": 1,
                                          "unique_id": f"test/algebra/{i}.json"} for i, (q, s) in enumerate(sums(2))])
    DatasetDict({"train": Dataset.from_list([
        {"id": 1600 + i, "question": q, "solution": [f"The sum is ${s}$."], "final_answer": [f"${s}$"],
         "context": None, "is_multiple_answer": False, "unit": None, "answer_type": "Numerical",
         "question_type": "Open-ended", "subfield": "Algebra", "subject": "Math", "language": "English"}
        for i, (q, s) in enumerate(sums(3))])}).save_to_disk(root / "olympiadbench")
    write_jsonl(root / "amc.jsonl", [{"id": i, "question": q, "answer": float(s), "url": "https://example.org"}
                                     for i, (q, s) in enumerate(sums(4))])
    write_jsonl(root / "aime24.jsonl", [{"ID": f"2024-I-{i + 1}", "Problem": q, "Solution": f"... {s}", "Answer": s}
                                        for i, (q, s) in enumerate(sums(5))])
    write_jsonl(root / "aime25.jsonl", [{"problem": q, "answer": str(s), "id": str(i)}
                                        for i, (q, s) in enumerate(sums(6))])
    return {key: root / name for key, name in (("gsm8k", "gsm8k"), ("math500", "math500.jsonl"),
                                               ("olympiadbench", "olympiadbench"), ("amc", "amc.jsonl"),
                                               ("aime24", "aime24.jsonl"), ("aime25", "aime25.jsonl"))}


def paper_benchmarks():
    """Every benchmark of the paper's two suites, as the suite files define them (dataset, split, fields)."""
    found = {}
    for name in ("qwen3_0.6b_from_4b", "qwen3_1.7b_from_8b"):
        found.update(yaml.safe_load((ROOT / "configs" / "eval" / f"{name}.yaml").read_text())["benchmarks"])
    return found


def suite_file(path, keys, n=4):
    """A suite file with the paper's benchmark definitions for `keys`, n samples each, the bare question as the prompt
    (the embedded task's format) and 16 new tokens (a 1-digit sum's worked solution takes 15)."""
    benchmarks = {key: {**spec, "n": n} for key, spec in paper_benchmarks().items() if key in keys}
    path.write_text(yaml.safe_dump({"temperature": 1.0, "max_new_tokens": 16, "prompt": "question",
                                    "system_prompt": "", "enable_thinking": False, "benchmarks": benchmarks},
                                   sort_keys=False))
    return path


def run_evaluate(*args):
    evaluate.main(list(map(str, args)))


def data_flag(benchmark_data, keys):
    return "--data=" + ",".join(f"{k}={benchmark_data[k]}" for k in keys)


def test_known_answers_score_high_in_every_benchmark_schema(models_dir, benchmark_data, tmp_path, capsys):
    """In each of the six benchmarks' real schemas the teacher gets pass@1 >= 0.9 and the random model <= 0.1; eval.json
    holds pass@1, its standard error over problems (recomputed here from the per-problem counts), n, problems and
    tokens; the suite mean is the unweighted mean; eval.md has one column per benchmark and the average."""
    keys = list(benchmark_data)
    suite = suite_file(tmp_path / "suite.yaml", keys)
    for model in ("teacher", "random"):
        run_evaluate(f"--suite={suite}", f"--model={models_dir / model}", f"--out={tmp_path / model}",
                     data_flag(benchmark_data, keys), "--batch_size=64")
        report = json.loads((tmp_path / model / "eval.json").read_text())
        [entry] = report["models"]
        assert list(entry["benchmarks"]) == keys
        for key, result in entry["benchmarks"].items():
            assert result["n"] == 4 and result["problems"] == PROBLEMS and result["tokens"] > 0, key
            assert (result["pass@1"] >= 0.9) if model == "teacher" else (result["pass@1"] <= 0.1), (model, key, result)
            stored = json.loads((Path(entry["results"]) / f"{key}.json").read_text())
            counts = [r["correct"] for r in stored["problems"]]
            rates = torch.tensor(counts, dtype=torch.float64) / 4
            assert result["pass@1"] == pytest.approx(float(rates.mean()), abs=1e-12)
            assert result["stderr"] == pytest.approx(float(rates.std() / PROBLEMS ** 0.5), abs=1e-12)
        means = [r["pass@1"] for r in entry["benchmarks"].values()]
        assert entry["mean"] == pytest.approx(sum(means) / len(means), abs=1e-12)
    table = (tmp_path / "teacher" / "eval.md").read_text().splitlines()
    assert table[0] == "| model | GSM8K | MATH-500 | OlympiadBench | AMC | AIME24 | AIME25 | Avg. (unweighted) |"
    assert table[2].startswith(f"| {models_dir / 'teacher'} | ") and table[2].count("|") == 9
    assert "unweighted mean of the 6 benchmark columns" in (tmp_path / "teacher" / "eval.md").read_text()
    assert "Avg. (unweighted)" in capsys.readouterr().out


def test_a_runs_checkpoints_of_both_formats_and_the_best_by_the_mean(models_dir, benchmark_data, tmp_path):
    """--run evaluates every checkpoint: train_small.py's (a Hugging Face folder per checkpoint) and train_fsdp.py's
    (torch.distributed.checkpoint shards of model and optimizer state, read onto the exported student's config); the
    exported student is skipped when a checkpoint holds the run's last step; the best by the suite mean is the one
    holding the teacher's weights, in bold in eval.md."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from transformers import AutoModelForCausalLM
    run = tmp_path / "run"
    tokenizer = synthetic_task.char_tokenizer()
    for step, seed in ((1, 7), (2, 8)):  # two random students, saved as train_small.py saves them
        student = synthetic_task.tiny_qwen3(tokenizer, 1, 64, seed=seed)
        optimizer = torch.optim.AdamW(student.parameters())
        checkpoints.save_checkpoint(run, step, student, optimizer, keep=3)
    teacher = AutoModelForCausalLM.from_pretrained(models_dir / "teacher")
    optimizer = torch.optim.AdamW(teacher.parameters())
    teacher(torch.tensor([[3, 4]])).logits.sum().backward()
    optimizer.step()  # AdamW state, as a training checkpoint holds it
    with torch.no_grad():  # the weights before the step: the teacher's own
        original = AutoModelForCausalLM.from_pretrained(models_dir / "teacher")
        for p, q in zip(teacher.parameters(), original.parameters()):
            p.copy_(q)
    model_state, optimizer_state = get_state_dict(teacher, optimizer)  # as train_fsdp.py's save_checkpoint calls it
    with warnings.catch_warnings():  # no process group: dcp says it saves from a single process, as it should
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=checkpoints.checkpoint_path(run, 3))
    (checkpoints.checkpoint_path(run, 3) / "state.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    save_model(synthetic_task.tiny_qwen3(tokenizer, 1, 64, seed=0), tokenizer, run / "student")  # the export's config
    (run / "summary.json").write_text(json.dumps({"steps": 3}))
    keys = ["math500", "aime24"]
    run_evaluate(f"--suite={suite_file(tmp_path / 'suite.yaml', keys)}", f"--run={run}",
                 data_flag(benchmark_data, keys))
    report = json.loads((run / "eval" / "suite" / "eval.json").read_text())
    assert [(e["model"], e["step"]) for e in report["models"]] == [("step_000001", 1), ("step_000002", 2),
                                                                   ("step_000003", 3)]
    assert report["best"] == "step_000003" and report["models"][2]["mean"] >= 0.9
    assert all(e["mean"] <= 0.1 for e in report["models"][:2])
    assert "| **step_000003** |" in (run / "eval" / "suite" / "eval.md").read_text()


def test_an_interrupted_evaluation_resumes_where_it_stopped(models_dir, benchmark_data, tmp_path, monkeypatch,
                                                            capsys):
    """Killed after three groups of problems, a rerun samples only the groups not yet scored and ends with the
    per-problem results of an uninterrupted evaluation (each group draws from its own seed; same ops, same values);
    a finished evaluation rerun loads no model; a changed setting stops with one line instead of mixing results."""
    keys = ["gsm8k", "aime25"]
    suite = suite_file(tmp_path / "suite.yaml", keys)
    common = [f"--suite={suite}", f"--model={models_dir / 'teacher'}", data_flag(benchmark_data, keys),
              "--batch_size=8"]  # 2 problems of 4 samples per group: 4 groups per benchmark
    run_evaluate(*common, f"--out={tmp_path / 'whole'}")
    calls, real_engine = [], evaluate.hf_engine

    def counted_engine(*args):
        sample = real_engine(*args)

        def counted(prompts, n, seed):
            calls.append(len(prompts))
            if len(calls) == 3 and stop:
                raise KeyboardInterrupt
            return sample(prompts, n, seed)
        return counted
    monkeypatch.setattr(evaluate, "hf_engine", counted_engine)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(*common, f"--out={tmp_path / 'parts'}")
    stop, calls[:] = False, []
    run_evaluate(*common, f"--out={tmp_path / 'parts'}")
    assert calls == [2] * 6  # gsm8k's last two groups and aime25's four
    folders = [Path(json.loads((tmp_path / out / "eval.json").read_text())["models"][0]["results"])
               for out in ("whole", "parts")]
    for key in keys:
        whole, parts = (json.loads((folder / f"{key}.json").read_text()) for folder in folders)
        assert parts == whole
    monkeypatch.setattr(evaluate, "hf_engine", lambda *args: pytest.fail("a finished evaluation loaded a model"))
    run_evaluate(*common, f"--out={tmp_path / 'parts'}")
    changed = suite_file(tmp_path / "suite.yaml", keys, n=2)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_evaluate(f"--suite={changed}", *common[1:], f"--out={tmp_path / 'parts'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds results of other settings (n: 4 there, 2 now)" in err[0], err


def test_counts_of_other_weights_are_scored_again(models_dir, benchmark_data, tmp_path, monkeypatch, capsys):
    """The per-problem counts record the weights they scored: rerun on a folder whose weights were replaced (a student
    retrained into the same path), the evaluation scores it again from scratch, says so in one line and ends with a
    fresh evaluation's numbers; counts that record no weights are scored again too; rerun on unchanged weights it
    loads no model. An --out whose parents do not exist is made, and the last line names the files written."""
    keys = ["gsm8k", "aime25"]
    model, out, fresh = tmp_path / "student", tmp_path / "new" / "eval" / "quick", tmp_path / "fresh"
    shutil.copytree(models_dir / "teacher", model)
    common = [f"--suite={suite_file(tmp_path / 'suite.yaml', keys)}", f"--model={model}",
              data_flag(benchmark_data, keys), "--batch_size=16"]
    run_evaluate(*common, f"--out={out}")
    report = json.loads((out / "eval.json").read_text())
    results = Path(report["models"][0]["results"])
    assert results.parent == out and report["models"][0]["mean"] >= 0.9
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"wrote {out / 'eval.json'}, {out / 'eval.md'} and the per-problem counts in {results}/")
    shutil.rmtree(model)
    shutil.copytree(models_dir / "random", model)  # retrained in place: same path, other weights
    run_evaluate(*common, f"--out={out}")
    notes = [line for line in capsys.readouterr().out.splitlines() if "scoring again" in line]
    assert notes == [f"{model}: its weights changed since {results / key}.json was scored; scoring again"
                     for key in keys]
    run_evaluate(*common, f"--out={fresh}")
    [again], [new] = (json.loads((folder / "eval.json").read_text())["models"] for folder in (out, fresh))
    assert again["benchmarks"] == new["benchmarks"] and again["weights"] == new["weights"] and again["mean"] <= 0.1
    for key in keys:
        assert (results / f"{key}.json").read_text() == (Path(new["results"]) / f"{key}.json").read_text()
    real_engine = evaluate.hf_engine
    monkeypatch.setattr(evaluate, "hf_engine", lambda *args: pytest.fail("unchanged weights loaded a model"))
    run_evaluate(*common, f"--out={out}")
    assert "scoring again" not in capsys.readouterr().out
    saved = json.loads((results / "aime25.json").read_text())
    del saved["weights"]  # counts written without a record of their weights
    (results / "aime25.json").write_text(json.dumps(saved))
    monkeypatch.setattr(evaluate, "hf_engine", real_engine)
    run_evaluate(*common, f"--out={out}")
    notes = [line for line in capsys.readouterr().out.splitlines() if "scoring" in line]
    assert notes == [f"{results / 'aime25.json'} does not record the weights it scored; scoring {model} again"]
    assert (results / "aime25.json").read_text() == (Path(new["results"]) / "aime25.json").read_text()


def test_the_weights_fingerprint_follows_the_weight_files_and_the_hub_commit(tmp_path, monkeypatch):
    """A local folder's fingerprint is its weight files' bytes: equal for a copy, changed by one byte of a .distcp
    shard, unchanged by a file that holds no weights (a DCP checkpoint's state.json); a hub name's is the commit its
    cached config.json resolves to (offline, from a cache written here), so it follows the commit main points at."""
    import huggingface_hub.constants
    checkpoint = tmp_path / "step_000003"
    checkpoint.mkdir()
    for name, data in (("__0_0.distcp", b"weights"), (".metadata", b"index"), ("state.json", b'{"step": 3}')):
        (checkpoint / name).write_bytes(data)
    fingerprint = evaluate.weights_fingerprint(("dcp", str(checkpoint)))
    assert evaluate.weights_fingerprint(("dcp", str(shutil.copytree(checkpoint, tmp_path / "copy")))) == fingerprint
    (checkpoint / "state.json").write_text('{"step": 4}')
    assert evaluate.weights_fingerprint(("dcp", str(checkpoint))) == fingerprint
    (checkpoint / "__0_0.distcp").write_bytes(b"weightz")
    assert evaluate.weights_fingerprint(("dcp", str(checkpoint))) != fingerprint
    repo = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for commit in ("a" * 40, "b" * 40):
        (repo / "refs" / "main").write_text(commit)
        assert evaluate.weights_fingerprint(("hf", "org/tiny")) == f"hub:org/tiny@{commit}"


@pytest.mark.parametrize("args, expected", [
    (["--engine=vllm"], "error: --engine=vllm needs the vLLM environment"),
    (["--data=nope=/tmp"], "error: --data: no benchmark 'nope'"),
    (["--data=math500=/no/such/file.jsonl"], "error: --data: math500='/no/such/file.jsonl' is not an existing"),
    (["--run=/no/such/run"], "error: --model or --run: give exactly one"),
    (["SUITE_WITHOUT_N"], "SUITE.yaml: benchmarks.math500.n: missing"),
    (["SUITE_BAD_FIELD"], "error: --data math500: no field 'problem' in"),
    (["--vllm_gpu_memory_utilization=0"], "error: --vllm_gpu_memory_utilization: must be in (0, 1], got 0.0"),
])
def test_bad_arguments_and_suites_are_one_line(models_dir, benchmark_data, tmp_path, capsys, args, expected):
    """vLLM without its environment, an unknown or missing local dataset, --model with --run, a suite without a
    benchmark's n, a dataset without the suite's question field and an engine fraction outside (0, 1] each stop with
    one line."""
    suite = suite_file(tmp_path / "SUITE.yaml", ["math500"])
    argv = [f"--suite={suite}", f"--model={models_dir / 'teacher'}"] + [a for a in args if not a.startswith("SUITE")]
    if args == ["SUITE_WITHOUT_N"]:
        spec = yaml.safe_load(suite.read_text())
        del spec["benchmarks"]["math500"]["n"]
        suite.write_text(yaml.safe_dump(spec))
    if args == ["SUITE_BAD_FIELD"]:
        argv.append(f"--data=math500={benchmark_data['aime24']}")  # AIME24's schema: Problem, not problem
    with pytest.raises(SystemExit):
        run_evaluate(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_reference_answers_as_each_dataset_stores_them():
    """OlympiadBench's ['$x$'] lists, AIME's integers, AMC's floats and GSM8K's '#### n' solutions become answers
    that math-verify matches against a boxed completion."""
    from distill import math_data
    for stored, completion in ((["$\\frac{1}{2}$"], "so \\boxed{0.5}"), (["$3$", "$4$"], "\\boxed{3, 4}"),
                               (204, "\\boxed{204}"), (27.0, "\\boxed{27}"), ("Work.\n#### 1,200", "\\boxed{1200}")):
        assert math_data.is_correct(completion, evaluate.reference_text(stored), exact=False), stored
    assert evaluate.reference_text(["$3$", "$4$"]) == "3, 4" and evaluate.reference_text(27.5) == "27.5"
    assert not math_data.is_correct("\\boxed{28}", evaluate.reference_text(27.0), exact=False)
