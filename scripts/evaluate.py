"""
The paper's evaluation as one command: every benchmark of a suite (configs/eval/*.yaml) on an exported student
folder, a hub model, or every checkpoint of a run, which then also names the best one by the suite mean (the paper's
checkpoint selection).

    python -m scripts.evaluate --model=runs/qwen3_1.7b_from_8b/student --suite=configs/eval/qwen3_1.7b_from_8b.yaml
    python -m scripts.evaluate --run=runs/qwen3_1.7b_from_8b --suite=configs/eval/qwen3_1.7b_from_8b.yaml
    python -m scripts.evaluate --model=Qwen/Qwen3-1.7B-Base --suite=configs/eval/quick.yaml --data=math500=./MATH-500

A suite file sets the prompt (as training formats it, or the bare question), the temperature, the length limit and
its benchmarks: for each a dataset (hub id, config, split), its question and answer fields and n, the samples per
problem. pass@1 = the mean over problems of c/n (c of the n samples right, math-verify as in training), with its
standard error over problems. Answers are read as the datasets store them: a "#### n" solution (GSM8K), a LaTeX string
(MATH-500), a list of them (OlympiadBench's final_answer, joined by ", "), an integer (AIME) or a float (1.0 -> 1).
--data replaces a benchmark's dataset id by a local save_to_disk folder or .json/.jsonl file (one split: used as is).

Written to --out: eval.json (per model and benchmark: pass@1, stderr, n, problems, tokens generated; the suite mean;
the weights' fingerprint; the best model), eval.md (the paper's Table 1 shape: one column per benchmark and their
unweighted mean) and <model>/<benchmark>.json, the per-problem counts, rewritten atomically after every group of
problems: rerun with the same arguments, an interrupted evaluation resumes from the benchmarks and problems already
scored (and a changed setting stops it with one line rather than mix two evaluations). Each of those files also holds a
fingerprint of the weights it scored (a hash of a local folder's weight files, or a hub name's commit): a student
retrained into the same folder is scored again from scratch, with one line saying so, rather than served the old
weights' counts.

Sampling goes through one function per model, an engine's `sample(prompts, n, seed)`; pick_engine is where the engine
is chosen. --engine=hf decodes with trb.blended_generate at eps 0 without a teacher (the student alone), in calls of
--batch_size rows, as training's evaluation does; --engine=vllm (in the vLLM environment, .venv-vllm) with the
vLLM engine holding the student alone, n samples per problem in one request (vllm_engine.py).
"""
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import train_small
from distill import evaluation, math_data, models, vllm_engine
from distill.checkpoints import complete_checkpoints, write_atomically
from distill.config import die, parse_flags, read_yaml

FLAGS = {
    "suite": (str, None, "the suite file, e.g. configs/eval/qwen3_1.7b_from_8b.yaml"),
    "model": (str, "", "an exported student folder or a hub name (or --run)"),
    "run": (str, "", "a run's out_dir: each of its checkpoints and its exported student, and the best by the mean"),
    "base": (str, "", "with --run: the tokenizer, model config and stop ids of its checkpoints (default: "
                      "<run>/student, the exported student; or the student's init, e.g. Qwen/Qwen3-1.7B-Base)"),
    "out": (str, "", "output folder (default: <run>/eval/<suite>, or runs/evals/<model>/<suite>)"),
    "data": (str, "", "local copies in place of dataset ids: benchmark=PATH[,benchmark=PATH...], each a save_to_disk "
                      "folder or a .json/.jsonl file"),
    "engine": (str, "hf", "hf (transformers, trb.blended_generate) or vllm (needs the vLLM environment)"),
    "vllm_gpu_memory_utilization": (float, 0.9, "--engine=vllm on a GPU: the fraction of its memory the engine takes"),
    "vllm_cpu_kv_cache_gib": (int, 1, "--engine=vllm on a CPU: GiB of its KV pool"),
    "batch_size": (int, 32, "rows per decode call (bounds the KV cache: 32 rows of 1.7B at 10,240 positions take 35 "
                            "GiB)"),
    "seed": (int, 0, "sampling seed (each group of problems draws from its own seed, so a resumed run samples the "
                     "same)"),
    "dtype": (str, "auto", "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16"),
    "cache": (str, "static", "KV cache: static (preallocated) or dynamic"),
    "compile": (bool, False, "torch.compile the per-token forward (needs cache static)"),
    "stop_check_every": (int, 16, "decoding asks whether every row is done every this many tokens"),
    "trust_remote_code": (bool, False, "passed to from_pretrained; only for models you trust"),
    "num_threads": (int, 0, "torch CPU threads (0 = torch default)"),
}
SUITE_KEYS = {"temperature": float, "max_new_tokens": int, "prompt": str, "system_prompt": str,
              "enable_thinking": bool, "benchmarks": dict}
BENCHMARK_KEYS = {"name": str, "dataset": str, "config": str, "split": str, "question": str, "answer": str, "n": int,
                  "problems": int}
BENCHMARK_DEFAULTS = {"config": "", "problems": 0}  # problems 0 = all; otherwise the first this many
SETTINGS = ("dataset", "config", "split", "question", "answer", "n")  # a benchmark's keys its stored results depend on
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")  # the files a model folder or checkpoint holds


# ------------------------------------------------------------------------------------------------------------------
# The suite and its datasets.


def _typed(where, value, kind):
    if kind is float and type(value) is int:
        value = float(value)
    if value is None and kind is str:
        value = ""
    if type(value) is not kind:
        die(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def load_suite(path):
    """The suite file as a namespace with a list of benchmark namespaces (key, name, dataset, ...); any missing,
    unknown or mistyped key stops with one line naming the file and the key."""
    values = read_yaml(path)
    for key in values:
        if key not in SUITE_KEYS:
            die(f"{path}: {key}: unknown key (keys: {', '.join(SUITE_KEYS)})")
    suite = {}
    for key, kind in SUITE_KEYS.items():
        if key not in values:
            die(f"{path}: {key}: missing")
        suite[key] = _typed(f"{path}: {key}", values[key], kind)
    if suite["prompt"] not in ("chat", "question"):
        die(f"{path}: prompt: must be chat (as training formats it) or question (the bare question), got "
            f"{suite['prompt']!r}")
    if suite["temperature"] < 0 or suite["max_new_tokens"] < 1 or not suite["benchmarks"]:
        die(f"{path}: needs temperature >= 0, max_new_tokens >= 1 and at least one benchmark")
    benchmarks = []
    for key, spec in suite["benchmarks"].items():
        where = f"{path}: benchmarks.{key}"
        if not isinstance(spec, dict):
            die(f"{where}: expected a mapping of {', '.join(BENCHMARK_KEYS)}")
        spec = {"name": key, **BENCHMARK_DEFAULTS, **spec}
        for field in spec:
            if field not in BENCHMARK_KEYS:
                die(f"{where}.{field}: unknown key (keys: {', '.join(BENCHMARK_KEYS)})")
        for field, kind in BENCHMARK_KEYS.items():
            if field not in spec:
                die(f"{where}.{field}: missing")
            spec[field] = _typed(f"{where}.{field}", spec[field], kind)
        if spec["n"] < 1 or spec["problems"] < 0:
            die(f"{where}: needs n >= 1 and problems >= 0 (0 = all)")
        benchmarks.append(SimpleNamespace(key=key, **spec))
    suite["benchmarks"] = benchmarks
    return SimpleNamespace(path=str(path), **suite)


def data_overrides(value, suite):
    """--data=key=PATH,... as {benchmark key: path}."""
    found = {}
    for item in filter(None, value.split(",")):
        key, _, path = item.partition("=")
        if key not in {b.key for b in suite.benchmarks}:
            die(f"--data: no benchmark {key!r} in {suite.path} (benchmarks: "
                f"{', '.join(b.key for b in suite.benchmarks)})")
        if not path or not os.path.exists(os.path.expanduser(path)):
            die(f"--data: {key}={path!r} is not an existing folder or file")
        found[key] = path
    return found


def reference_text(answer):
    """A dataset answer as the text math_data.is_correct compares: lists joined by ", ", integers as written, integral
    floats without ".0", and a string without the $...$ that OlympiadBench wraps its answers in."""
    if isinstance(answer, (list, tuple)):
        return ", ".join(reference_text(a) for a in answer)
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    text = str(answer).strip()
    return text[1:-1].strip() if len(text) > 1 and text[0] == text[-1] == "$" else text


def load_benchmark(bench, override):
    """(questions, reference answers) of a benchmark: its dataset's split, or the one split of a local override (a
    .jsonl file is one split whatever the benchmark calls its own), the first `problems` rows if set."""
    source = override or bench.dataset
    key = f"benchmarks.{bench.key}.dataset" if override is None else f"--data {bench.key}"
    data = math_data._load(source, "" if override else bench.config, key)
    rows = next(iter(data.values())) if override and len(data) == 1 else math_data._split(data, bench.split, key,
                                                                                          source)
    for field in (bench.question, bench.answer):
        if field not in rows.column_names:
            die(f"{key}: no field {field!r} in {source!r} (columns: {', '.join(rows.column_names)})")
    if bench.problems:
        rows = rows.select(range(min(bench.problems, len(rows))))
    if not len(rows):
        die(f"{key}: {source!r} has no rows")
    return [str(q) for q in rows[bench.question]], [reference_text(a) for a in rows[bench.answer]]


# ------------------------------------------------------------------------------------------------------------------
# What is evaluated: one model, or a run's checkpoints. A source is (kind, path): "hf" a folder or hub name that
# from_pretrained loads, "dcp" a train_fsdp.py checkpoint (sharded torch.distributed.checkpoint) read onto --base.


def models_to_evaluate(args):
    """[(label, source, step)]: --model, or --run's complete checkpoints oldest first and then its exported student,
    unless a checkpoint holds the run's last step (summary.json) already."""
    if bool(args.model) == bool(args.run):
        die("--model or --run: give exactly one (an exported student or hub name, or a run's out_dir)")
    if args.model:
        return [(args.model, ("hf", args.model), None)]
    run = Path(args.run)
    if not run.is_dir():
        die(f"--run: {args.run!r} is not a folder")
    found = []
    for path in complete_checkpoints(run):
        step = int(path.name.split("_")[1])
        if (path / "student" / "config.json").exists():
            found.append((path.name, ("hf", str(path / "student")), step))  # train_small.py's checkpoint
        elif (path / ".metadata").exists():
            found.append((path.name, ("dcp", str(path)), step))  # train_fsdp.py's
    summary = run / "summary.json"
    last = json.loads(summary.read_text())["steps"] if summary.exists() else None
    if (run / "student" / "config.json").exists() and last not in [step for _, _, step in found]:
        found.append(("student", ("hf", str(run / "student")), last))
    if not found:
        die(f"--run: no checkpoint and no exported student in {args.run!r}")
    return found


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def weights_fingerprint(source):
    """What identifies the weights a source holds, stored with its results: the path alone does not (a run's student
    is retrained into the same folder). A local folder (an exported student, a checkpoint's student/, a DCP
    checkpoint) is a BLAKE2b hash of its weight files' names, sizes and bytes (of every file if it holds none of
    WEIGHT_SUFFIXES); a hub name is hub:<name>@<commit>, the commit its config.json resolves to now."""
    _, path = source
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():  # the local cache first, then the hub (models.load_named)
        from huggingface_hub import hf_hub_download
        config = models.load_named("--model", path, lambda name, local: hf_hub_download(
            name, "config.json", local_files_only=local), "the config of ")
        return f"hub:{path}@{Path(config).parent.name}"  # the snapshot folder is named by its commit
    files = sorted(f for f in folder.iterdir() if f.is_file())
    files = [f for f in files if f.suffix in WEIGHT_SUFFIXES] or files
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:  # shards hash side by side
        digests = list(pool.map(file_hash, files))
    total = hashlib.blake2b()
    for f, digest in zip(files, digests):
        total.update(f"{f.name} {f.stat().st_size} {digest}\n".encode())
    return f"blake2b:{total.hexdigest()}"


def load_tokenizer(name, key, trust_remote_code):
    """name's tokenizer, left-padded: from the local Hugging Face cache first, one line naming key if it cannot be
    loaded (models.load_named)."""
    return models.pretrained_tokenizer(key, name, trust_remote_code)


def stop_ids(name, tokenizer):
    """The tokenizer's EOS and every EOS id of name's generation_config: an exported student lists each id training
    stopped at (a Base student with a chat teacher: both)."""
    from transformers import GenerationConfig

    def load(local_files_only):
        try:
            return GenerationConfig.from_pretrained(os.path.expanduser(name), local_files_only=local_files_only)
        except (OSError, ValueError):  # a model without generation_config.json stops at its tokenizer's EOS
            return None

    if os.path.exists(os.path.expanduser(name)):
        generation = load(False)
    else:  # a hub name: the local cache first, then the hub if it can answer (else the model's load says why not)
        generation = load(True)
        if generation is None and not models.hub_unavailable(name):
            generation = load(False)
    return models.stop_token_ids(tokenizer, SimpleNamespace(generation_config=generation))


def load_model(source, base, args, dtype):
    """The model of a source in the compute dtype (rotary frequencies kept float32)."""
    kind, path = source
    if kind == "hf":
        return models.load_pretrained("--model" if args.model else "--run", path, args, dtype)
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM
    config = models.load_named("--base", base, lambda name, local: AutoConfig.from_pretrained(
        name, trust_remote_code=args.trust_remote_code, local_files_only=local), "a model config from ")
    model = AutoModelForCausalLM.from_config(config)
    wanted = model.state_dict()  # the parameters' own tensors: dcp.load fills them in place (tied ones once)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    missing = [k for k in wanted if f"model.{k}" not in stored]
    filled = {wanted[k].data_ptr() for k in wanted if k not in missing}
    unfilled = [k for k in missing if wanted[k].data_ptr() not in filled]  # not tied to a stored tensor either
    if unfilled:
        die(f"--run: checkpoint {path} does not hold {unfilled[0]!r} of --base {base!r}'s model (another model?)")
    with warnings.catch_warnings():  # "no process group: assuming a single process", which is the case here
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load({"model": {k: v for k, v in wanted.items() if k not in missing}}, checkpoint_id=path)
    return models.to_compute_dtype(model, dtype)


# ------------------------------------------------------------------------------------------------------------------
# Engines: sample(prompts, n, seed) -> (n completions per prompt, tokens generated per prompt).


def pick_engine(name):
    """The engine factory by name, (source, base, tokenizer, eos_ids, suite, args) -> sample: the one place where an
    engine is chosen."""
    if name == "hf":
        return hf_engine
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            die("--engine=vllm needs the vLLM environment (.venv-vllm, made by ./run.sh from requirements-vllm.txt); "
                "--engine=hf runs here")
        return vllm_engine_sample
    die(f"--engine: must be hf or vllm, got {name!r}")


def vllm_engine_sample(source, base, tokenizer, eos_ids, suite, args):
    """sample() on the vLLM engine holding the student alone (vllm_engine.Engine without a teacher): each call's
    prompts in one request, n samples per prompt; sample.close() shuts the engine down before the next model."""
    device, dtype = models.device_and_dtype(args)
    model = load_model(source, base, args, dtype).eval()  # on the CPU: the GPU is the engine's alone
    window = model.config.max_position_embeddings  # the engine's longest sequence: prompt and completion
    if window <= suite.max_new_tokens:
        die(f"--suite: max_new_tokens {suite.max_new_tokens} does not fit the model's {window} positions")
    cfg = SimpleNamespace(teacher="", seed=args.seed, max_prompt_tokens=window - suite.max_new_tokens,
                          max_new_tokens=suite.max_new_tokens, eval_max_new_tokens=suite.max_new_tokens,
                          vllm_cpu_kv_cache_gib=args.vllm_cpu_kv_cache_gib,
                          vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
    with tempfile.TemporaryDirectory(prefix="trb_eval_engine_") as folder:
        engine = vllm_engine.Engine(cfg, model, None, len(tokenizer), eos_ids, folder, with_teacher=False,
                                    device=device)
    del model

    def sample(prompts, n, seed):
        ids, _ = engine.generate(engine.unpadded(*math_data.encode_prompts(prompts, tokenizer, "cpu")), eps=0.0,
                                 temperature=suite.temperature, max_new_tokens=suite.max_new_tokens, n=n, seed=seed)
        return ([tokenizer.batch_decode(c, skip_special_tokens=True) for c in ids],
                [sum(len(x) for x in c) for c in ids])

    sample.close = engine.close
    return sample


def hf_engine(source, base, tokenizer, eos_ids, suite, args):
    """sample() on a transformers model: trb.blended_generate at eps 0 with no teacher (the student alone, as
    training's evaluation decodes), --batch_size rows per call, each call's prompts' n samples side by side."""
    device, dtype = models.device_and_dtype(args)
    model = load_model(source, base, args, dtype).to(device).eval()
    cfg = SimpleNamespace(dtype=args.dtype, stop_check_every=args.stop_check_every, cache=args.cache,
                          compile=args.compile, rollout_batch_size=args.batch_size, max_new_tokens=suite.max_new_tokens)
    decoder = evaluation.HFDecoder(cfg, model, None, train_small.SingleDevice(), eos_ids, tokenizer.pad_token_id,
                                   len(tokenizer))

    @torch.no_grad()
    def sample(prompts, n, seed):
        input_ids, mask = (x.repeat_interleave(n, 0) for x in math_data.encode_prompts(prompts, tokenizer, device))
        rollout = decoder.rollouts(input_ids, mask, torch.Generator(device).manual_seed(seed), eps=0.0,
                                   temperature=suite.temperature)
        texts = tokenizer.batch_decode(rollout.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
        tokens = rollout.completion_mask.sum(1).tolist()
        return ([texts[i * n:(i + 1) * n] for i in range(len(prompts))],
                [int(sum(tokens[i * n:(i + 1) * n])) for i in range(len(prompts))])

    return sample


# ------------------------------------------------------------------------------------------------------------------
# Scoring with resume, and the summary.


def group_seed(seed, bench, first):
    """The seed of the group of problems starting at `first`: fixed by the problems, not by what ran before."""
    return zlib.crc32(f"{seed}/{bench.key}/{first}".encode())


def stored_results(path, header):
    """The per-problem results already in path ([] if none). Results of other settings stop with one line (another
    evaluation was asked for); results of other weights, or of unrecorded ones, are dropped with one line and the
    benchmark is scored again from its first problem, so old and new counts never mix."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    for key, value in header["settings"].items():
        if saved["settings"].get(key) != value:
            die(f"--out: {path} holds results of other settings ({key}: {saved['settings'].get(key)!r} there, "
                f"{value!r} now); choose another --out or delete that file")
    if saved.get("weights") != header["weights"]:
        model = header["settings"]["model"]
        print(f"{model}: its weights changed since {path} was scored; scoring again" if saved.get("weights") else
              f"{path} does not record the weights it scored; scoring {model} again", flush=True)
        return []
    return saved["problems"]


def score(sample, bench, questions, references, prompts, path, header, results, label, args):
    """The per-problem results [{correct, tokens}] of a benchmark, resumed from `results` (those already in `path`)
    and saved there with `header` (settings and weights) after every group of problems (problems per group:
    batch_size // n, at least one)."""
    per_group = max(1, args.batch_size // bench.n)
    bar = tqdm(total=len(questions), initial=min(len(results), len(questions)), desc=f"{label} {bench.name}",
               unit="problem", dynamic_ncols=True)
    while len(results) < len(questions):
        first = len(results)
        group = range(first, min(first + per_group, len(questions)))
        texts, tokens = sample([prompts[i] for i in group], bench.n, group_seed(args.seed, bench, first))
        for i, completions, count in zip(group, texts, tokens):
            results.append({"correct": sum(bool(math_data.is_correct(text, references[i], exact=False))
                                           for text in completions), "tokens": count})
        write_atomically(path, json.dumps({**header, "problems": results}))
        bar.update(len(group))
    bar.close()
    return results[:len(questions)]


def summarize(results, n):
    """pass@1 = mean over problems of c/n, and its standard error over problems (sample sd / sqrt(problems))."""
    rates = [r["correct"] / n for r in results]
    mean = sum(rates) / len(rates)
    stderr = (math.sqrt(sum((x - mean) ** 2 for x in rates) / (len(rates) - 1) / len(rates)) if len(rates) > 1
              else None)
    return {"pass@1": mean, "stderr": stderr, "n": n, "problems": len(rates),
            "tokens": sum(r["tokens"] for r in results)}


def suite_mean(benchmarks):
    """The unweighted mean of the benchmarks' pass@1 (each benchmark counts once, whatever its size), and its
    standard error sqrt(sum stderr^2) / k, the benchmarks' samples being independent."""
    values = list(benchmarks.values())
    mean = sum(v["pass@1"] for v in values) / len(values)
    errors = [v["stderr"] for v in values]
    return mean, (math.sqrt(sum(e * e for e in errors)) / len(values) if None not in errors else None)


def cell(value, stderr):
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def table(report, suite):
    """eval.md: one row per model, one column per benchmark and the unweighted mean, the best row in bold."""
    names = [b.name for b in suite.benchmarks]
    lines = ["| model | " + " | ".join(names) + " | Avg. (unweighted) |", "|---" * (len(names) + 2) + "|"]
    for entry in report["models"]:
        cells = [cell(entry["benchmarks"][b.key]["pass@1"], entry["benchmarks"][b.key]["stderr"])
                 for b in suite.benchmarks] + [cell(entry["mean"], entry["mean_stderr"])]
        label = f"**{entry['model']}**" if entry["model"] == report.get("best") else entry["model"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    samples = ", ".join(f"{b.name} {b.n}" for b in suite.benchmarks)
    lines += ["", f"pass@1 (%): the mean over problems of c/n, ± its standard error over problems; n samples per "
                  f"problem: {samples}; temperature {suite.temperature:g}, up to {suite.max_new_tokens} new tokens, "
                  f"answers checked with math-verify. Avg.: the unweighted mean of the {len(names)} benchmark columns "
                  f"(each counts once, whatever its number of problems), ± sqrt(sum of squared errors) / "
                  f"{len(names)}."]
    if report.get("best"):
        lines.append(f"Best by Avg.: **{report['best']}** (bold), the paper's checkpoint selection.")
    return "\n".join(lines) + "\n"


def default_out(args, suite):
    stem = Path(suite.path).stem
    if args.run:
        return Path(args.run) / "eval" / stem
    return Path("runs") / "evals" / args.model.strip("./").replace("/", "__") / stem


def main(argv=None):
    args = parse_flags(sys.argv[1:] if argv is None else argv, FLAGS,
                       "usage: python -m scripts.evaluate --suite=FILE (--model=NAME | --run=DIR) [--key=value ...]")
    make_engine = pick_engine(args.engine)  # before anything loads: an engine this environment lacks stops at once
    for key, choices in (("dtype", ("auto", "float32", "bfloat16")), ("cache", ("static", "dynamic"))):
        if getattr(args, key) not in choices:
            die(f"--{key}: must be one of {', '.join(choices)}, got {getattr(args, key)!r}")
    if args.compile and args.cache != "static":
        die("--compile: true needs --cache=static")
    if args.batch_size < 1:
        die(f"--batch_size: must be >= 1, got {args.batch_size}")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        die(f"--vllm_gpu_memory_utilization: must be in (0, 1], got {args.vllm_gpu_memory_utilization}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    suite = load_suite(args.suite)
    overrides = data_overrides(args.data, suite)
    todo = models_to_evaluate(args)
    base = args.base or (str(Path(args.run) / "student") if args.run else args.model)
    if args.run and not args.base and not (Path(base) / "config.json").exists():
        die(f"--base: {base} does not exist (the run has not exported its student yet); name the student's init, "
            f"e.g. --base=Qwen/Qwen3-1.7B-Base")
    from transformers.utils import logging
    logging.disable_progress_bar()
    data = {b.key: load_benchmark(b, overrides.get(b.key)) for b in suite.benchmarks}  # every dataset before a model
    tokenizer = load_tokenizer(base, "--base" if args.run else "--model", args.trust_remote_code)
    eos_ids = stop_ids(base, tokenizer)
    fmt = SimpleNamespace(dataset="benchmark", system_prompt=suite.system_prompt, enable_thinking=suite.enable_thinking)
    prompts = {key: [math_data.format_prompt(q, tokenizer, fmt) if suite.prompt == "chat" else q for q in questions]
               for key, (questions, _) in data.items()}
    out = Path(args.out) if args.out else default_out(args, suite)
    report = {"suite": suite.path, "engine": args.engine, "temperature": suite.temperature,
              "max_new_tokens": suite.max_new_tokens, "prompt": suite.prompt, "seed": args.seed,
              "mean": "the unweighted mean of the benchmarks' pass@1", "models": []}
    for label, source, step in todo:
        folder = out / label.strip("./").replace("/", "__")
        folder.mkdir(parents=True, exist_ok=True)
        weights = weights_fingerprint(source)  # once per model: hashing a large model's files takes seconds
        sample, entry = None, {"model": label, "source": source[1], "weights": weights, "step": step,
                               "results": str(folder), "benchmarks": {}}
        for bench in suite.benchmarks:
            settings = {"model": source[1], **{k: getattr(bench, k) for k in SETTINGS},
                        "data": overrides.get(bench.key),
                        "temperature": suite.temperature, "max_new_tokens": suite.max_new_tokens,
                        "prompt": suite.prompt, "system_prompt": suite.system_prompt,
                        "enable_thinking": suite.enable_thinking, "seed": args.seed, "engine": args.engine}
            path, header = folder / f"{bench.key}.json", {"settings": settings, "weights": weights}
            questions, references = data[bench.key]
            results = stored_results(path, header)
            if sample is None and len(results) < len(questions):  # load only what has work left
                sample = make_engine(source, base, tokenizer, eos_ids, suite, args)
            results = score(sample, bench, questions, references, prompts[bench.key], path, header, results, label,
                            args)
            entry["benchmarks"][bench.key] = {"name": bench.name, **summarize(results, bench.n)}
        entry["mean"], entry["mean_stderr"] = suite_mean(entry["benchmarks"])
        report["models"].append(entry)
        getattr(sample, "close", lambda: None)()  # an engine's memory goes before the next model's
        del sample
        if len(report["models"]) > 1:
            report["best"] = max(report["models"], key=lambda e: e["mean"])["model"]
        write_atomically(out / "eval.json", json.dumps(report, indent=2))
        write_atomically(out / "eval.md", table(report, suite))
    print(table(report, suite) + f"\nwrote {out / 'eval.json'}, {out / 'eval.md'} and the per-problem counts in "
          + ", ".join(f"{entry['results']}/" for entry in report["models"]))


if __name__ == "__main__":
    main()
