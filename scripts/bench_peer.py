"""
The peer benchmark (`python -m scripts.bench peer`): a train_small.py OPD step against a step of TRL's
DistillationTrainer on the same job, and TRB's warmup step (the teacher decodes in lockstep) beside them.

The job: Qwen3-shaped random models with Qwen3's 151,936-row head (student 256 wide, 4 layers, tied head; teacher 384
wide, 6 layers), a tokenizer of that size, 8 prompts of 36 tokens a step, one 64-token completion each (no EOS on
either side), float32, AdamW, the full-vocabulary reverse KL. Each side runs in a fresh process per round (peak RSS
is per process), the sides interleaved round by round, and each process times its steps after one warm-up step.

Matched settings: TRL's defaults that differ from train_small's are set to train_small's values, namely
gradient_checkpointing False (TRL: True), bf16 False (TRL: True where supported), optim adamw_torch (TRL:
adamw_torch_fused), lr_scheduler_type constant (TRL: linear decay), weight_decay, betas and max_grad_norm as in
config.yaml, beta 1.0 (reverse KL), and generation_kwargs min_new_tokens so that TRL's rollouts run to 64 tokens
as ours do. TRL is a development requirement only (requirements-dev.txt): where it is missing, its side is skipped
with one line.

Both sides do the same work: equal completion tokens per step, and train_small's loss on TRL's own first rollout
equals TRL's loss (replay_loss; printed by the benchmark, asserted by tests/test_bench.py).
"""
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import train_small
import trb
from distill import evaluation, math_data, qwen3
from distill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"opd": "train_small.py --method=opd", "trl": "TRL DistillationTrainer (beta 1)",
         "trb": "train_small.py --method=trb, warmup (eps 0.02)", "opd_dense": "train_small.py --chunked_loss=false"}


@dataclass
class Setting:
    """The job's shapes (the defaults are the benchmark's; tests shrink them)."""
    vocab: int = 151936
    student_hidden: int = 256
    student_layers: int = 4
    teacher_hidden: int = 384
    teacher_layers: int = 6
    prompts: int = 8
    prompt_tokens: int = 36
    new_tokens: int = 64


def write_setting(folder, setting, steps):
    """student/, teacher/ (each with the tokenizer, grown to the heads' width) and questions.json under folder, made
    once per setting and kept (a changed setting writes them anew)."""
    folder = Path(folder)
    meta = dict(asdict(setting), steps=steps)
    if (folder / "questions.json").exists() and json.loads((folder / "questions.json").read_text())["meta"] == meta:
        return folder
    tokenizer = qwen3.qwen3_sized_tokenizer("<|endoftext|>", chat_template=False)
    tokenizer.add_tokens([f"<pad{i}>" for i in range(setting.vocab - len(tokenizer))])
    assert len(tokenizer) == setting.vocab
    for name, hidden, layers, tied, seed in (("student", setting.student_hidden, setting.student_layers, True, 1),
                                             ("teacher", setting.teacher_hidden, setting.teacher_layers, False, 2)):
        qwen3.random_qwen3(setting.vocab, hidden, layers, seed, tied, qwen3.BASE_EOS).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    # format_prompt with an empty system prompt writes "\n\n{question}\n": 3 tokens around the question
    width = setting.prompt_tokens - 3
    questions = [f"Problem {i}: what is {i % 97} + {i % 89}?".ljust(width, ".")[:width]
                 for i in range(setting.prompts * steps)]
    (folder / "questions.json").write_text(json.dumps(dict(meta=meta, questions=questions)))
    return folder


def our_config(folder, setting, method, chunked=True):
    return load_config([f"--student={folder / 'student'}", f"--teacher={folder / 'teacher'}",
                        f"--dataset={folder / 'questions.json'}", "--dataset_config=", f"--method={method}",
                        "--eps0=0.02", "--warmup_steps=100000", f"--batch_size={setting.prompts}",
                        "--rollouts_per_prompt=1", f"--max_new_tokens={setting.new_tokens}",
                        f"--chunked_loss={str(chunked).lower()}", "--dtype=float32", "--lr=1e-5",
                        "--lr_warmup_steps=0", "--system_prompt=", f"--out_dir={folder / 'ours'}"])


def load_pair(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder / "student")
    student, teacher = (AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32)
                        for name in ("student", "teacher"))
    return tokenizer, student, teacher.eval().requires_grad_(False)


def our_run(folder, setting, method, chunked=True, decoder=None):
    """train_small's Run over the benchmark's models with no stop ids (every rollout runs to new_tokens)."""
    cfg = our_config(folder, setting, method, chunked)
    tokenizer, student, teacher = load_pair(folder)
    runtime = train_small.SingleDevice()
    run = train_small.Run(cfg, runtime, tokenizer, student, teacher, train_small.make_optimizer(student, cfg), [])
    run.decoder = decoder or evaluation.HFDecoder(cfg, student, teacher, runtime, [], tokenizer.pad_token_id,
                                                  len(tokenizer))
    return run


def questions_of(folder):
    return json.loads((Path(folder) / "questions.json").read_text())["questions"]


def run_ours(folder, setting, method, steps, chunked=True):
    """(seconds, completion tokens, loss) of each of `steps` train_step calls."""
    run = our_run(folder, setting, method, chunked)
    questions, B, out = questions_of(folder), setting.prompts, []
    for step in range(steps):
        started = time.perf_counter()
        metrics = train_small.train_step(run, questions[step * B:(step + 1) * B], step)
        out.append((time.perf_counter() - started, metrics["completion_tokens"], metrics["loss"]))
    return out


def trl_trainer(folder, setting, steps):
    """TRL's DistillationTrainer on the same models and prompts, its defaults matched to train_small's (see above)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    cfg = our_config(folder, setting, "opd")
    tokenizer, student, teacher = load_pair(folder)
    prompts = [math_data.format_prompt(q, tokenizer, cfg) for q in questions_of(folder)]
    # transformers 5.25 renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in DistillationConfig.__dataclass_fields__
                     else "gradient_checkpointing")
    args = DistillationConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=setting.prompts, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip, optim="adamw_torch", bf16=False, **{checkpointing: False},
        max_completion_length=setting.new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=1.0,
        generation_kwargs={"min_new_tokens": setting.new_tokens}, shuffle_dataset=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    trainer.seen = []  # per step: completion tokens, loss, and the rollout (prompt and completion ids)
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        trainer.seen.append(dict(tokens=int(inputs["completion_mask"].sum()), loss=loss.item(),
                                 prompt_ids=inputs["prompt_ids"].clone(),
                                 completion_ids=inputs["completion_ids"].clone()))
        return loss
    trainer.compute_loss = recording
    return trainer


def run_trl(folder, setting, steps):
    """(seconds, completion tokens, loss) of each of `steps` TRL steps (on_step_begin to on_step_end: generation,
    loss, backward and the optimizer step)."""
    from transformers import TrainerCallback
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            times.append(-time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            times[-1] += time.perf_counter()
    trainer = trl_trainer(folder, setting, steps)
    trainer.add_callback(Timer())
    trainer.train()
    return [(t, s["tokens"], s["loss"]) for t, s in zip(times, trainer.seen)]


class Replay:
    """A decoder whose rollouts are given (prompt ids (B, P), completion ids (B, N), none stopping at EOS), in any row
    order (TRL shuffles the rows of its batch)."""
    rollout_diagnostics = True

    def __init__(self, prompt_ids, completion_ids):
        self.prompt_ids, self.completion_ids = prompt_ids, completion_ids

    def rollouts(self, input_ids, attention_mask, generator, **kwargs):
        order = [next(j for j, given in enumerate(self.prompt_ids) if torch.equal(row, given)) for row in input_ids]
        B, N = self.completion_ids.shape
        nan = torch.full((B, N), float("nan"))
        return trb.Rollout(sequences=torch.cat([input_ids, self.completion_ids[order]], 1),
                           completion_mask=torch.ones(B, N, dtype=torch.bool), beta=torch.zeros(B, N),
                           behavior_logprobs=nan, teacher_logprobs=nan, realised_kl=torch.zeros(B, N),
                           teacher_entropy=nan, replaced=torch.zeros(B, N, dtype=torch.bool))

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def sync(self, student):
        pass


def replay_loss(folder, setting):
    """(TRL's step-1 loss and completion tokens, train_small's loss and completion tokens on TRL's own rollout)."""
    trainer = trl_trainer(folder, setting, 1)
    trainer.train()
    seen = trainer.seen[0]
    run = our_run(folder, setting, "opd", decoder=Replay(seen["prompt_ids"], seen["completion_ids"]))
    metrics = train_small.train_step(run, questions_of(folder)[:setting.prompts], 0)
    return (seen["loss"], seen["tokens"]), (metrics["loss"], metrics["completion_tokens"])


def child(side, folder, steps, warmup):
    """One process of one side: prints its steps (after `warmup` untimed ones) and its peak RSS as JSON."""
    setting = Setting(**{k: v for k, v in json.loads((Path(folder) / "questions.json").read_text())["meta"].items()
                         if k != "steps"})
    folder = Path(folder)
    if side == "trl":
        rows = run_trl(folder, setting, warmup + steps)
    else:
        rows = run_ours(folder, setting, "trb" if side == "trb" else "opd", warmup + steps, side != "opd_dense")
    print(json.dumps(dict(steps=rows[warmup:], peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          threads=torch.get_num_threads())))


def has_trl():
    try:
        import trl  # noqa: F401
        return True
    except ImportError:
        return False


def bench_peer(args, setting=None):
    """Rounds of one fresh process per side, interleaved; the medians, ranges and ratios to TRL's."""
    setting = setting or Setting()
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"error: --sides: unknown side {unknown[0]!r}; choose from {', '.join(SIDES)}")
    if "trl" in sides and not has_trl():
        print("TRL is not installed (pip install -r requirements-dev.txt): its side is skipped")
        sides.remove("trl")
    folder = write_setting(Path(args.peer_dir), setting, args.steps + 1)
    results = {side: dict(times=[], tokens=[], peaks=[]) for side in sides}
    for round_ in range(args.rounds):
        for side in sides:
            out = subprocess.run([sys.executable, "-m", "scripts.bench", "_peer_child", side, str(folder),
                                  str(args.steps), "1", f"--threads={args.threads}"], cwd=ROOT, capture_output=True,
                                 text=True)
            if out.returncode:
                raise SystemExit(f"error: the {side} process failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[side]["times"] += [t for t, _, _ in row["steps"]]
            results[side]["tokens"] += [n for _, n, _ in row["steps"]]
            results[side]["peaks"].append(row["peak_mib"])
            median = statistics.median(t for t, _, _ in row["steps"])
            print(f"  round {round_ + 1}/{args.rounds} {side:9s} median {median:6.2f} "
                  f"s/step, peak RSS {row['peak_mib']:7.0f} MiB, {row['threads']} thread(s)", flush=True)
    print(f"\nOne step, {setting.prompts} prompts x {setting.prompt_tokens} tokens, one {setting.new_tokens}-token "
          f"completion each, V={setting.vocab}, float32, {args.threads} thread(s); {args.rounds} rounds x "
          f"{args.steps} timed steps per side, interleaved:")
    print(f"  {'side':50s} {'s/step median (min-max)':>26s} {'peak RSS median (min-max)':>28s} {'tokens/step':>12s}")
    for side, r in results.items():
        times, peaks = r["times"], r["peaks"]
        print(f"  {SIDES[side]:50s} {statistics.median(times):9.2f} ({min(times):.2f}-{max(times):.2f})      "
              f"{statistics.median(peaks):8.0f} ({min(peaks):.0f}-{max(peaks):.0f}) MiB "
              f"{statistics.median(r['tokens']):10.0f}")
    def ratio(side, to, key):  # median of side over median of to
        return statistics.median(results[side][key]) / statistics.median(results[to][key])
    pairs = [(side, "trl", f"{side} / TRL") for side in results if side != "trl" and "trl" in results]
    if "trb" in results and "opd" in results:
        pairs.append(("trb", "opd", "TRB warmup / OPD"))
    for side, to, name in pairs:
        print(f"  {name}: time {ratio(side, to, 'times'):.2f}x, peak {ratio(side, to, 'peaks'):.2f}x")
    if "trl" in results and args.check:
        torch.set_num_threads(args.threads)
        (trl_loss, trl_tokens), (our_loss, our_tokens) = replay_loss(folder, setting)
        print(f"  same work: step 1 on TRL's rollout, {trl_tokens} vs {our_tokens} completion tokens, loss "
              f"{trl_loss:.6f} (TRL) vs {our_loss:.6f} (train_small)")
    return results
