"""
The full-size path on one GPU in under 8 minutes, before a long run: random-weight Qwen3-1.7B <- Qwen3-8B shapes (no
download), one report. What it runs, each part in its own process with its own time limit, so one failure still
leaves the others' figures:

  1. decode   bench.py decode --device=cuda --dtype=bfloat16 at 1.7B <- 8B, 16 rows, 512 new tokens, static and
              compiled: the blended decode's tokens/s against student.generate + teacher.generate, the token rule's
              share of a step, peak memory.
  2. train    train_small.py's real-model path for 2 steps (a TRB warmup, so both models decode) with 512 new
              tokens per row, from model folders written here, with the measured peak memory of each moment (rollout,
              training, evaluation; torch.cuda.max_memory_allocated) beside memory_plan.py's figure for the same config.
  3. fsdp     torchrun --nproc_per_node=1 train_fsdp.py on NCCL for 2 steps on the same folders.
  4. engine   bench.py engine at 1.7B <- 8B in the vLLM environment: the engine's tokens/s at 64 rows and 4096 new
              tokens against the HF loop's static path (16 rows per call, the preset's rollout_batch_size: 64 rows'
              caches do not fit beside the models; timed over 512 tokens, whose shorter cache favours it), the GPU
              memory its start took against its fraction, and its greedy tokens at eps 0.5.
  5. eager    the same engine without torch.compile or CUDA graphs: its greedy tokens against part 4's, token for
              token (CUDA graphs that let the teacher overwrite the student's hidden states would differ at once).
  6. train_engine   train_small.py --engine=vllm for 1 step on part 2's folders, the engine's fraction from the
              memory plan: each moment's peak and the device's used memory beside the plan.
Parts 4 to 6 run where vLLM is installed (run the check with .venv-vllm/bin/python, built from the file that
./run.sh vllm-requirements names) and are skipped where it is not. The parts' time limits (LIMITS) add up to under 8
minutes; a part that reaches its limit is reported as stopped there.

    python -m scripts.gpu_check --out=gpu_report                 # writes gpu_report/report.md and one log per part
    python -m scripts.gpu_check --prepare                        # on a machine with the network: wheels into .whl/

The project pins transformers >= 5.24 (its forwards take `cache=`). A machine whose Python has an older transformers
(or lacks datasets or math-verify) gets them from .whl/ if that folder is there: --prepare downloads their wheels
(15 MB, no dependencies: the machine's image has the rest) for Python 3.12 on x86-64 Linux, and gpu_check.py installs
them first.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each part's time limit in seconds: with the model folders written once, the whole check is under 8 minutes
LIMITS = {"decode": 70, "train": 70, "fsdp": 60, "engine": 140, "eager": 45, "train_engine": 75}
NEEDED = ["transformers==5.24.0", "datasets==5.2.0", "math-verify==0.9.0", "latex2sympy2_extended==1.11.0",
          "antlr4-python3-runtime==4.13.2", "dill==0.4.1", "multiprocess==0.70.19"]  # 15 MB; the rest is there


def prepare(folder):
    """Download the wheels NEEDED, without their dependencies (the GPU machine's image has torch, numpy, pandas,
    pyarrow, tokenizers, safetensors and huggingface_hub), for its Python 3.12 on x86-64 Linux."""
    folder.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version=3.12",
                    "--platform=manylinux2014_x86_64", "--platform=manylinux_2_28_x86_64", "--platform=any",
                    "--implementation=cp", "-d", str(folder), *NEEDED], check=True)


def install_carried(folder, log):
    """pip install NEEDED from folder, offline, when the running Python does not already satisfy them."""
    try:
        import transformers
        from packaging.version import Version
        if Version(transformers.__version__) >= Version("5.24"):
            import datasets  # noqa: F401
            import math_verify  # noqa: F401
            return "already installed"
    except ImportError:
        pass
    if not folder.is_dir():
        return (f"not installed: no {folder} (run python -m scripts.gpu_check --prepare where the network is, then "
                "carry it)")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                             f"--find-links={folder}", *NEEDED],
                            capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    return "installed from " + str(folder) if result.returncode == 0 else f"pip install failed (see {log.name})"


def write_models(folder):
    """Random-weight Qwen3-1.7B-Base and Qwen3-8B shapes in bf16, with a Qwen3-sized tokenizer each (Base EOS for the
    student, chat EOS and template for the teacher), and small prompt and answer files."""
    import torch
    from transformers import Qwen3ForCausalLM
    from distill import memory_plan
    from distill.qwen3 import BASE_EOS, CHAT_EOS, qwen3_sized_tokenizer
    for name, size, eos in (("student", "1.7B-Base", BASE_EOS), ("teacher", "8B", [CHAT_EOS, BASE_EOS])):
        if (folder / name / "config.json").exists():
            continue
        config = memory_plan.builtin_qwen3(f"Qwen/Qwen3-{size}")
        config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, BASE_EOS, None
        torch.manual_seed(len(name))
        with torch.device("cuda"):
            model = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.generation_config.eos_token_id = eos
        model.save_pretrained(folder / name)
        del model
        torch.cuda.empty_cache()
        tokenizer = qwen3_sized_tokenizer("<|endoftext|>" if name == "student" else "<|im_end|>",
                                          chat_template=name == "teacher")
        tokenizer.save_pretrained(folder / name)
    with open(folder / "prompts.jsonl", "w") as f:  # training prompts: no answer field, as OpenThoughts3
        f.writelines(json.dumps({"question": f"What is {i} + {2 * i}? Explain each step."}) + "\n" for i in range(64))
    with open(folder / "eval.jsonl", "w") as f:
        f.writelines(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(8))


def run_args(models, out_dir):
    """The 1.7B <- 8B preset cut to two short steps: 4 prompts x 4 rollouts of 512 new tokens, TRB warmup."""
    return [f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}", f"--student={models / 'student'}",
            f"--teacher={models / 'teacher'}", f"--dataset={models / 'prompts.jsonl'}",
            f"--eval_dataset={models / 'eval.jsonl'}", "--eval_split=train", "--max_steps=2", "--batch_size=4",
            "--max_new_tokens=512", "--eval_size=8", "--eval_samples=2", "--eval_max_new_tokens=512",
            "--eval_every=0", "--checkpoint_every=0", "--shown_problems=1", "--overwrite=true",
            "--max_prompt_tokens=256",  # the prompts here are about 150 tokens (one per character)
            f"--out_dir={out_dir}"]


def measured_train(argv):
    """Run in a child process: train_small.train on argv with the peak GPU memory of each of memory_plan's moments
    (torch.cuda.max_memory_allocated inside the ranges a run marks with memory_plan.moment), printed as one JSON
    line beside memory_plan.plan's totals for the same config and GPU (GiB), with the device's used memory at the
    end of each moment (torch.cuda.mem_get_info: with engine vllm, its pool and graphs too). The plan counts a 2 GiB
    allowance for the CUDA context and NCCL that the allocator does not see."""
    from contextlib import contextmanager

    import torch
    import train_small
    from distill import memory_plan
    from distill.config import load_config
    cfg = load_config(argv)
    peaks, used = dict.fromkeys(memory_plan.MOMENTS, 0.0), dict.fromkeys(memory_plan.MOMENTS, 0.0)

    @contextmanager
    def measured(name):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2 ** 30)
            peaks["at rest"] = max(peaks["at rest"], torch.cuda.memory_allocated() / 2 ** 30)
            free, total = torch.cuda.mem_get_info()  # the whole device: the vLLM engine's pool and graphs too
            used[name] = max(used[name], (total - free) / 2 ** 30)

    memory_plan.moment = measured  # looked up at each use
    started = time.time()
    history = train_small.train(cfg)
    gpu_gib = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    planned = memory_plan.plan(cfg, 1, gpu_gib)["totals"]
    print(json.dumps({"wall_s": round(time.time() - started, 1), "measured_gib": peaks, "device_used_gib": used,
                      "planned_gib": {m: planned[m] / 2 ** 30 for m in peaks},
                      "losses": [row["loss"] for row in history if "loss" in row],
                      "tokens_per_s": [row["tokens_per_s"] for row in history if "tokens_per_s" in row]}))


def memory_table(output):
    """Report lines of a measured_train run's JSON line: each moment's measured peak and device use beside the plan."""
    found = [line for line in output.splitlines() if line.startswith("{")]
    if not found:
        return []
    result = json.loads(found[-1])
    lines = ["| moment | measured peak GiB | device used GiB | memory plan GiB | plan / measured |",
             "|---|---|---|---|---|"]
    for moment, measured in result["measured_gib"].items():
        planned, used = result["planned_gib"][moment], result["device_used_gib"][moment]
        lines.append(f"| {moment} | {measured:.1f} | {used:.1f} | {planned:.1f} | "
                     f"{planned / measured if measured else float('nan'):.2f} |")
    return lines + ["", f"losses {result['losses']}, rollout tokens/s {[round(x) for x in result['tokens_per_s']]}",
                    ""]


def compare_tokens(graphs, eager):
    """A report line: the greedy tokens of the engine with CUDA graphs against the eager engine's, token for token."""
    if not (graphs.exists() and eager.exists()):
        return "greedy tokens: not compared (a part did not write its tokens)"
    a, b = json.loads(graphs.read_text()), json.loads(eager.read_text())
    same = sum(x == y for x, y in zip(a, b))
    first = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))) for x, y in zip(a, b)
             if x != y]
    return (f"greedy tokens at eps 0.5, CUDA graphs vs eager: {same} of {len(a)} rows equal token for token"
            + (f"; the others first differ at tokens {first}" if first else ""))


def part(name, command, timeout, out, env=None):
    """Run one part with its own time limit; its output goes to out/<name>.log. Returns (status, seconds, output)."""
    started = time.time()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        status, output = ("ok" if result.returncode == 0 else f"failed (exit {result.returncode})",
                          result.stdout + result.stderr)
    except subprocess.TimeoutExpired as error:
        status = f"stopped at its {timeout} s limit"
        output = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
    (out / f"{name}.log").write_text(output)
    return status, time.time() - started, output


def main():
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_report", help="folder for report.md and the parts' logs")
    parser.add_argument("--models", default="/tmp/trb_gpu_check", help="where the random-weight folders are written")
    parser.add_argument("--prepare", action="store_true", help="download the wheels into .whl/ and stop")
    parser.add_argument("--parts", default=",".join(LIMITS), help="which parts, comma-separated")
    parser.add_argument("--_measured_train", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measured_train is not None:
        return measured_train(args._measured_train)
    if args.prepare:
        return prepare(ROOT / ".whl")
    import torch
    out, models = Path(args.out), Path(args.models)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    carried = install_carried(ROOT / ".whl", out / "pip.log")
    import transformers
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines += [f"- machine: {gpu}; torch {torch.__version__}; transformers {transformers.__version__} "
              f"(project packages: {carried})", ""]
    if not torch.cuda.is_available():
        (out / "report.md").write_text("\n".join(lines + ["No CUDA device: nothing was run."]) + "\n")
        return print("\n".join(lines) + f"\nwrote {out / 'report.md'}")
    parts = args.parts.split(",")
    if "decode" in parts:
        status, seconds, output = part("decode", [sys.executable, "-m", "scripts.bench", "decode", "--device=cuda",
                                                  "--dtype=bfloat16", "--pairs=1.7B:8B", "--batch=16",
                                                  "--new_tokens=512", "--settings=static,compiled", "--runs=1"],
                                       LIMITS["decode"], out)
        table = [line for line in output.splitlines() if line.startswith(("blended decode", "  "))]
        lines += [f"## 1. decode: {status}, {seconds:.0f} s", "", "```", *table, "```", ""]
    if {"train", "fsdp"} & set(parts):
        started = time.time()
        write_models(models)
        lines += [f"Model folders (random weights, bf16) written to {models} in {time.time() - started:.0f} s.", ""]
    if "train" in parts:
        status, seconds, output = part("train", [sys.executable, "-m", "scripts.gpu_check", "--_measured_train",
                                                 *run_args(models, out / "run_small")], LIMITS["train"], out)
        lines += [f"## 2. train_small.py, real-model path, 2 steps: {status}, {seconds:.0f} s", ""]
        lines += memory_table(output)
    if "fsdp" in parts:
        status, seconds, output = part("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node=1", "train_fsdp.py",
                                                *run_args(models, out / "run_fsdp")], LIMITS["fsdp"], out)
        losses = [json.loads(line)["loss"] for line in (out / "run_fsdp" / "metrics.jsonl").read_text().splitlines()
                  if "loss" in line] if (out / "run_fsdp" / "metrics.jsonl").exists() else []
        lines += [f"## 3. torchrun --nproc_per_node=1 train_fsdp.py (NCCL), 2 steps: {status}, {seconds:.0f} s", "",
                  f"losses {losses}", ""]
    engine_parts = [name for name in ("engine", "eager", "train_engine") if name in parts]
    try:
        import vllm  # noqa: F401
    except ImportError:
        if engine_parts:
            lines += [f"## 4-6. {', '.join(engine_parts)}: skipped (vLLM is not installed in this Python)", ""]
        engine_parts = []
    bench = [sys.executable, "-m", "scripts.bench", "engine", "--device=cuda", "--dtype=bfloat16", "--runs=1",
             "--prompt_tokens=128", f"--models={models}"]
    if engine_parts:
        write_models(models)
    if "engine" in engine_parts:
        status, seconds, output = part("engine", [*bench, "--batch=64", "--new_tokens=4096", "--hf_rows=16",
                                                  "--hf_new_tokens=512", f"--tokens_out={out / 'tokens_graphs.json'}"],
                                       LIMITS["engine"], out)
        table = [line for line in output.splitlines() if line.startswith(("vLLM engine", "  ", "greedy"))]
        lines += [f"## 4. engine: {status}, {seconds:.0f} s", "", "```", *table, "```", ""]
    if "eager" in engine_parts:
        status, seconds, output = part("eager", [*bench, "--batch=16", "--new_tokens=128", "--eager",
                                                 f"--tokens_out={out / 'tokens_eager.json'}"], LIMITS["eager"], out)
        lines += [f"## 5. eager engine: {status}, {seconds:.0f} s", "",
                  compare_tokens(out / "tokens_graphs.json", out / "tokens_eager.json"), ""]
    if "train_engine" in engine_parts:
        status, seconds, output = part("train_engine", [sys.executable, "-m", "scripts.gpu_check", "--_measured_train",
                                                        *run_args(models, out / "run_engine"), "--engine=vllm",
                                                        "--max_steps=1"], LIMITS["train_engine"], out)
        fraction = [line for line in output.splitlines() if line.startswith("vllm_gpu_memory_utilization:")]
        lines += [f"## 6. train_small.py --engine=vllm, 1 step: {status}, {seconds:.0f} s", "", *fraction, "",
                  *memory_table(output)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwrote {out / 'report.md'} and each part's log beside it")


if __name__ == "__main__":
    main()
