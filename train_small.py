"""
On-policy distillation with Trust-Region Behavior Blending (TRB, arXiv 2605.31159) on one device.

The student learns by the OPD loss (E1, reverse KL to the frozen teacher on every visited prefix); the method only
changes who writes the rollouts: `trb.behavior(method, step, cfg)` picks the behavior policy (vanilla OPD, TRB's
annealed trust-region blend, fixed-eps, SKD, ...) and `trb.blended_generate` samples from it.

Launch (every config.yaml key can be overridden as --key=value; --help lists them):
    python train_small.py                                   # embedded offline default, CPU, a few minutes
    ./run.sh                                                # the same on a fresh clone (sets up .venv first)
    python train_small.py --method=opd --max_steps=60       # another behavior policy, shorter run
    python train_small.py --resume=true                     # continue from the last checkpoint in out_dir
    python train_small.py --overwrite=true                  # start over in an out_dir that holds a run's checkpoints
    python train_small.py --compare=opd,trb                  # seeds 0-7, paired differences with 95% intervals
    python train_small.py --config=configs/gsm8k_1gpu.yaml  # Qwen3-0.6B-Base <- Qwen3-4B on GSM8K, one GPU

Read top-down: the data order, the hooks where train_fsdp.py differs, the training step, then the run: train() is
its loop. The machinery is in distill/: config.py (every key, its type, check and meaning), models.py (loading the
models, dtypes, stop ids), math_data.py (prompts, real datasets, answer checking), evaluation.py (the run's decoder,
held-out pass@1, the shown problems), checkpoints.py (atomic checkpoints, relaunch and resume, the logs and summary),
tracking.py (report_to), synthetic_task.py (the embedded offline task and its cached teacher and student),
compare.py (--compare over seeds). The commands besides training are in scripts/ (python -m scripts.evaluate, ...).
"""
import hashlib
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import trb
from distill import checkpoints, compare, evaluation, fast, math_data, memory_plan, models, vllm_engine
from distill.config import die, load_config

# ------------------------------------------------------------------------------------------------------------------
# Data: which prompts a step trains on (math_data.py loads and formats them).


def train_questions(train, step, cfg):
    """Questions for one step: epoch-wise seeded permutations, so the data position is a function of the step."""
    start = step * cfg.batch_size
    rows = []
    for position in range(start, start + cfg.batch_size):
        epoch, index = divmod(position, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        rows.append(train[int(order[index])]["question"])
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Where train_fsdp.py differs. train() and train_step() call these hooks wherever several processes would have to
# cooperate; on one device each is trivial. train_fsdp.py's subclass overrides them, and that is all it changes.


class SingleDevice:
    """train_small.py's hooks: one process, all rows, nothing to gather or reduce."""
    rank, world = 0, 1
    interruption = None  # the run's checkpoints.Interruption (train)
    decodes_compute_dtype = False  # float32 master weights: a bf16 run decodes a bf16 copy (evaluation.HFDecoder)

    @property
    def is_main(self):
        """Whether this process logs, prints and writes out_dir (FSDP: rank 0)."""
        return self.rank == 0

    def main_first(self):
        """Context in which the main process runs first (FSDP: it trains or downloads and caches, the others wait)."""
        return nullcontext()

    def prepare(self, student, teacher):
        """(student, teacher) ready for training (FSDP: sharded)."""
        return student, teacher

    def gathered(self, *models):
        """Context in which the models' full parameters stay in memory (FSDP: all-gathered once, for a whole block)."""
        return nullcontext()

    def sync_gradients(self, student, last):
        """Called before each micro-batch's backward: whether to reduce gradients now (FSDP: on the last only)."""

    def all_finished(self, done):
        """The rollout's stop rule given this process's done rows (FSDP: every rank decodes the same steps)."""
        return bool(done.all())

    def sum(self, values):
        """A list of numbers summed over processes (FSDP: all-reduce)."""
        return list(values)

    def interrupted(self):
        """The signal that stops the run after this step, or None (checkpoints.Interruption; FSDP: one that any rank
        received, agreed through the step's sums, so that every rank saves the same step and stops)."""
        return self.interruption.signal

    def everywhere(self, flag):
        """Whether `flag` holds in every process (FSDP: a MIN all-reduce), for decisions that stop the run or pick
        its checkpoint: every rank must take them together, or one would wait in a collective the others never
        reach."""
        return bool(flag)

    def stop(self, message):
        """Ends the run with exit code 2 and one line from the main process (config.die). Every process calls it at
        once, after they agreed (`everywhere`); FSDP: the process group is closed first."""
        if self.is_main:
            die(message)
        sys.exit(2)

    def share(self, n):
        """This process's rows of a global batch of n (FSDP: a contiguous 1/world of them)."""
        return slice(0, n)

    def head_weight(self, model, V):
        """The output embedding's rows of the shared vocabulary, as chunked_opd_loss reads them."""
        return model.get_output_embeddings().weight[:V]

    def save_checkpoint(self, out_dir, step, student, optimizer, keep):
        checkpoints.save_checkpoint(out_dir, step, student, optimizer, keep)

    def load_checkpoint(self, path, student, optimizer, cfg):
        return checkpoints.load_checkpoint(path, student, optimizer, cfg.trust_remote_code)

    def close_decoder(self, decoder):
        """Frees the run's decoder once training is done (FSDP: later, with the process group)."""
        decoder.close()

    def export(self, student, tokenizer, path, eos_ids):
        """The final student as a plain Hugging Face folder (safetensors) that from_pretrained loads, which stops
        `generate` (or vLLM) at every stop id it was trained with."""
        plain = models.with_stop_ids(student, eos_ids, tokenizer.pad_token_id)
        checkpoints.save_atomically(path, lambda tmp: (plain.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


# ------------------------------------------------------------------------------------------------------------------
# The training step: rollouts from the behavior policy, then E1 on micro-batches with gradient accumulation.


def lr_at(step, cfg):
    """Paper schedule: cosine warmup over lr_warmup_steps, then constant."""
    if step >= cfg.lr_warmup_steps:
        return cfg.lr
    return cfg.lr * 0.5 * (1 - math.cos(math.pi * (step + 1) / (cfg.lr_warmup_steps + 1)))


def make_optimizer(student, cfg):
    return torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


def forward_completions(model, sequences, mask, P, V, hidden):
    """
    Logits (B, N, V) or last hidden states (B, N, H) at the positions that predict the N completion tokens, and
    nothing else computed or kept: the head multiplies those N positions only (hidden: none), no KV cache, no per-layer
    hidden states (2.5 GB per 8k-token row of an 8B teacher).
    """
    inputs = dict(input_ids=sequences, attention_mask=mask, position_ids=trb.position_ids(mask), use_cache=False)
    predicting = torch.arange(P - 1, sequences.shape[1] - 1, device=sequences.device)  # (N,) by index: contiguous
    if not hidden:
        return model(**inputs, logits_to_keep=predicting).logits[..., :V]
    # The final norm's output, caught on its way out of the decoder, through the root forward (not the decoder
    # alone) so that FSDP's root hooks gather embeddings, norm and head; the head then multiplies no position.
    caught = []
    handle = model.get_decoder().register_forward_hook(lambda module, args, out: caught.append(out[0]))
    try:
        model(**inputs, logits_to_keep=predicting[:0])
    finally:
        handle.remove()
    return caught[0][:, P - 1:-1]  # (B, N, H)


def trimmed(rollout, mask, rows, P):
    """
    (sequences, mask, completion_mask, P') of a micro-batch of rows, cut to its own width: the columns of left padding
    that all its rows share, and the completion columns after its longest row, are dropped (all are masked out and, in
    a causal model, change nothing), so a micro-batch never runs at the width of the longest row of the whole step.
    """
    completion_mask = rollout.completion_mask[rows]
    n = max(int(completion_mask.sum(1).max()), 1) if completion_mask.numel() else 1
    left = int(mask[rows, :P].any(0).long().argmax())  # first column where some row's prompt starts
    return rollout.sequences[rows, left:P + n], mask[rows, left:P + n], completion_mask[:, :n], P - left


def teacher_view_sums(teacher_logits, tokens, mask):
    """Sums over completion tokens (mask (B, N)) of log pi_T(sampled token) and of the teacher's entropy, from
    teacher_logits (B, N, V): the diagnostics of docs/method.md section 7, for every method (even when the rollout did
    not run the teacher)."""
    log_pt = torch.log_softmax(teacher_logits.float(), -1)  # (B, N, V)
    logprob = log_pt.gather(-1, tokens[..., None])[..., 0][mask].sum().item()
    entropy = -(log_pt.exp() * log_pt.nan_to_num(neginf=0.0)).sum(-1)[mask].sum().item()
    return logprob, entropy


@dataclass
class Run:
    """What a training step and an evaluation read: the config and the hooks (SingleDevice, or train_fsdp.FSDP), the
    models and their tokenizer, the optimizer, the stop ids, and the decoder of rollouts and evaluation
    (evaluation.HFDecoder, or the vLLM engine)."""
    cfg: object
    runtime: SingleDevice
    tokenizer: object
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    eos_ids: list
    decoder: object = None


def rollout_generator(seed, step, rank, device):
    """
    The rollout sampler of one step, seeded by (seed, step, rank) alone: two methods of one seed draw the same noise
    at every step wherever their models agree (a generator run on across steps would drift apart after the first
    rollout of a different length), and a resumed run draws exactly what an uninterrupted one does with no sampler
    state in its checkpoints.
    """
    key = hashlib.blake2b(f"rollouts/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(key, "little"))


def train_step(run, questions, step):
    """
    One OPD update on `questions` (under FSDP: this rank's share of the step's prompts). The loss of each micro-batch
    is its sum of per-token KL divided by the completion tokens of the whole step (all ranks), so neither rollout
    batching, micro-batching nor the number of ranks changes the update.
    """
    cfg, runtime, student, teacher, decoder = run.cfg, run.runtime, run.student, run.teacher, run.decoder
    device = next(student.parameters()).device
    V = len(run.tokenizer)  # shared tokenizer range: heads may be wider (padded vocab)
    started = time.time()
    kwargs = trb.behavior(cfg.method, step, cfg)  # eps from kl_budget (E5), temperature, token rule of `method`
    prompts = [math_data.format_prompt(q, run.tokenizer, cfg) for q in questions]
    input_ids, prompt_mask = (x.repeat_interleave(cfg.rollouts_per_prompt, 0)  # (B, P), B = prompts * rollouts
                              for x in math_data.encode_prompts(prompts, run.tokenizer, device))
    B, P = input_ids.shape
    # 1) rollouts from the behavior policy (the teacher decodes in lockstep only when the policy needs it)
    student.eval()
    with memory_plan.moment("rollout peak"):
        rollout = decoder.rollouts(input_ids, prompt_mask, rollout_generator(cfg.seed, step, runtime.rank, device),
                                   **kwargs)
    decoder.sleep()  # a GPU's engine memory is free while the loss runs
    mask = torch.cat([prompt_mask, rollout.completion_mask.long()], 1)  # (B, P+N)
    stats = evaluation.rollout_stats(rollout)
    total_tokens = runtime.sum([stats["completion_tokens"]])[0]  # completion tokens of the whole step
    # 2) micro-batches of rows: teacher and student forwards on the sampled sequences (the rollout is data)
    student.train()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = logprob_sum = entropy_sum = 0.0
    visited = torch.zeros(4)  # engine: sums of beta, realised KL, teacher log-prob and entropy over visited tokens
    micro = cfg.micro_batch_size or B
    for start in range(0, B, micro):
        sequences, row_mask, completion_mask, p = trimmed(rollout, mask, slice(start, start + micro), P)
        runtime.sync_gradients(student, last=start + micro >= B)
        with models.autocast(cfg), memory_plan.moment("loss forward"):
            with torch.no_grad(), runtime.gathered(teacher):
                teacher_out = forward_completions(teacher, sequences, row_mask, p, V, cfg.chunked_loss)
                teacher_head = runtime.head_weight(teacher, V) if cfg.chunked_loss else None
            student_out = forward_completions(student, sequences, row_mask, p, V, cfg.chunked_loss)
            # 3) E1: reverse KL to the teacher at every completion token, with one stop event as in the rollout
            if cfg.chunked_loss:
                loss = fast.chunked_opd_loss(student_out, runtime.head_weight(student, V), teacher_out, teacher_head,
                                             completion_mask, chunk_mib=cfg.loss_chunk_mib, topk=cfg.loss_topk,
                                             eos_ids=run.eos_ids)
            else:
                student_out, teacher_out = (trb.canonicalise_eos(x, run.eos_ids) for x in (student_out, teacher_out))
                loss = trb.opd_loss(student_out, teacher_out, completion_mask, topk=cfg.loss_topk)
                # the teacher's view of the visited tokens for every method, from this forward
                logprob, entropy = teacher_view_sums(teacher_out, sequences[:, p:], completion_mask)
                logprob_sum, entropy_sum = logprob_sum + logprob, entropy_sum + entropy
            if not decoder.rollout_diagnostics:  # the engine returns tokens only: the diagnostics from this forward
                heads = (runtime.head_weight(student, V), teacher_head) if cfg.chunked_loss else None
                visited += vllm_engine.visited_sums(student_out, teacher_out, heads, sequences[:, p:],
                                                    completion_mask, kwargs, run.eos_ids, cfg.loss_chunk_mib)
        # opd_loss is a mean over this micro-batch's tokens: make it their sum / the step's tokens, so the accumulated
        # gradients are the full batch's. Backward of loss * world: FSDP's reduce-scatter averages over ranks.
        loss = loss * (int(completion_mask.sum()) / max(total_tokens, 1))
        with memory_plan.moment("loss backward"):
            (loss * runtime.world).backward()
        loss_sum += loss.item()
    # 4) AdamW step with grad-norm clipping, lr from the warmup schedule
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    with memory_plan.moment("optimizer step"):
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        run.optimizer.step()
    decoder.wake_up()
    decoder.sync(student)  # the updated student decodes the next step
    # Metrics: token means over the whole step (sums over ranks); NaN where the teacher did not run.
    n = stats["completion_tokens"]
    sums = {k: stats[k] * n if n else 0.0
            for k in ("beta", "realised_kl", "replaced_frac", "teacher_logprob", "teacher_entropy")}
    if not cfg.chunked_loss:
        sums.update(teacher_logprob=logprob_sum, teacher_entropy=entropy_sum)
    if not decoder.rollout_diagnostics:
        sums.update(zip(("beta", "realised_kl", "teacher_logprob", "teacher_entropy"), visited.tolist()))
    loss, *totals = runtime.sum([loss_sum, *sums.values()])
    return {"step": step + 1, "loss": loss, "eps": kwargs["eps"], "temperature": kwargs["temperature"],
            **{k: s / total_tokens if total_tokens else math.nan for k, s in zip(sums, totals)},
            "completion_tokens": int(total_tokens), "grad_norm": grad_norm.item(), "lr": lr_at(step, cfg),
            "tokens_per_s": total_tokens / (time.time() - started)}


# ------------------------------------------------------------------------------------------------------------------
# The training run.


def train(cfg, runtime=None):
    """One distillation run; the main process writes metrics.jsonl, samples.jsonl, summary.json, checkpoints and the
    final student to out_dir (checkpoints.py: what a relaunch or a resume finds there). SIGTERM or SIGINT stops it
    after the step in progress with a checkpoint, raising checkpoints.Interrupted (checkpoints.Interruption)."""
    runtime = runtime or SingleDevice()
    with checkpoints.Interruption(say=runtime.is_main) as runtime.interruption:
        return run_training(cfg, runtime)


def run_training(cfg, runtime):
    """train()'s body, with the stop signals handled: load, resume, the loop, the export and the summary."""
    started = time.time()
    if cfg.batch_size % runtime.world:  # unequal shares would mean unequal collectives, i.e. a hang
        die(f"batch_size: {cfg.batch_size} prompts do not split evenly over {runtime.world} ranks")
    if cfg.engine == "vllm":
        vllm_engine.require()
    found = checkpoints.checkpoints_to_resume(cfg, runtime)  # before any model loads: a relaunch may stop here
    tokenizer, train_split, held_out, student, teacher, teacher_scores = load(cfg, runtime)
    eos_ids = models.stop_token_ids(tokenizer, student, teacher)
    run = Run(cfg, runtime, tokenizer, student, teacher, make_optimizer(student, cfg), eos_ids)
    checkpoint, start = checkpoints.resume_from(found, student, run.optimizer, cfg, runtime)
    if runtime.interrupted():  # during loading: nothing new to save
        raise checkpoints.Interrupted(runtime.interrupted(), start, checkpoint)
    log = checkpoints.RunLog(cfg.out_dir, start, resumed=checkpoint is not None, write=runtime.is_main, cfg=cfg)
    run.decoder = make_decoder(run, start)
    if start == 0:
        teacher_alone = evaluation.HFDecoder(cfg, teacher, None, runtime, eos_ids, tokenizer.pad_token_id,
                                             len(tokenizer))
        log.samples(0, "teacher", evaluation.sample_completions(teacher_alone, tokenizer, held_out, cfg))
        log.record({"step": 0, "eps": trb.behavior(cfg.method, 0, cfg)["eps"], "beta": 0.0,
                    **evaluate_at(run, 0, held_out, log)})
    bar = tqdm(range(start, cfg.max_steps), desc=f"distill {cfg.method} seed {cfg.seed}"
               f"{f' x{runtime.world}' if runtime.world > 1 else ''}", initial=start, total=cfg.max_steps,
               disable=not runtime.is_main)
    for step in bar:
        questions = train_questions(train_split, step, cfg)[runtime.share(cfg.batch_size)]
        row = train_step(run, questions, step)
        if (cfg.eval_every and row["step"] % cfg.eval_every == 0) or row["step"] == cfg.max_steps:
            row.update(evaluate_at(run, row["step"], held_out, log))
        log.record(row)
        if run.decoder.has_teacher and row["step"] < cfg.max_steps and not vllm_engine.teacher_needed(cfg, row["step"]):
            run.decoder.drop_teacher()  # the budget is 0 from here on: the teacher is not run again
        bar.set_postfix(loss=f"{row['loss']:.3f}", eps=f"{row['eps']:.3f}", beta=f"{row['beta']:.3f}")
        stopping = runtime.interrupted() if row["step"] < cfg.max_steps else None  # the last step finishes the run
        if stopping or (cfg.checkpoint_every and row["step"] % cfg.checkpoint_every == 0):
            runtime.save_checkpoint(Path(cfg.out_dir), row["step"], student, run.optimizer, cfg.keep_checkpoints)
        if stopping:
            bar.close()
            log.close()
            runtime.close_decoder(run.decoder)
            raise checkpoints.Interrupted(stopping, row["step"], checkpoints.checkpoint_path(cfg.out_dir, row["step"]))
    log.close()
    runtime.close_decoder(run.decoder)
    runtime.export(student, tokenizer, Path(cfg.out_dir) / "student", eos_ids)
    if runtime.is_main:
        log.write_summary(cfg, runtime.world, teacher_scores, started)
    return log.history


def make_decoder(run, step):
    """The run's decoder of rollouts and evaluation, from `step` on: the Hugging Face loop (engine: hf) or the vLLM
    engine (engine: vllm; it holds the teacher only while the policy needs it)."""
    vocab_size, pad_token_id = len(run.tokenizer), run.tokenizer.pad_token_id
    if run.cfg.engine == "vllm":
        return vllm_engine.start(run.cfg, run.student, run.teacher, vocab_size, run.eos_ids, pad_token_id, step,
                                 run.runtime.rank)
    return evaluation.HFDecoder(run.cfg, run.student, run.teacher, run.runtime, run.eos_ids, pad_token_id, vocab_size)


def score_alone(model, tokenizer, held_out, cfg):
    """The held-out scores of a model evaluated alone, in one process, before any run: the embedded task's teacher,
    once (under FSDP rank 0 scores it while the others wait)."""
    alone = SingleDevice()
    decoder = evaluation.HFDecoder(cfg, model, None, alone, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                   len(tokenizer))
    return evaluation.evaluate(decoder, tokenizer, held_out, cfg, cfg.data_seed, alone)


def load(cfg, runtime):
    """(tokenizer, train split, held-out split, student, teacher, teacher_scores), the models ready for training (FSDP:
    sharded). FSDP, embedded task: rank 0 trains and caches the synthetic models, the others then load them. Real
    models: every rank loads at once (the hub's file locks make one of them download), so no rank waits in a
    collective."""
    random.seed(cfg.seed)
    with runtime.main_first() if cfg.student == "synthetic" else nullcontext():
        tokenizer = models.load_tokenizer(cfg)
        train_split, held_out = math_data.load_run_splits(cfg, tokenizer, verbose=runtime.is_main)
        tokenizer, student, teacher, teacher_scores = models.load_models(cfg, train_split, held_out, tokenizer,
                                                                         score_alone)
    student, teacher = runtime.prepare(student, teacher)
    return tokenizer, train_split, held_out, student, teacher, teacher_scores


def evaluate_at(run, step, held_out, log):
    """The student's held-out pass@1 and greedy accuracy at `step` (on the embedded task also its reverse KL to the
    teacher and the reference solutions' log-likelihood, held_out_scores), after logging its completions of the shown
    problems (the same ones at every evaluation)."""
    log.samples(step, "student", evaluation.sample_completions(run.decoder, run.tokenizer, held_out, run.cfg))
    scorer = (lambda *args: held_out_scores(run, *args)) if run.cfg.dataset == "synthetic" else None
    return evaluation.evaluate(run.decoder, run.tokenizer, held_out, run.cfg, run.cfg.seed + step, run.runtime,
                               scorer)


@torch.no_grad()
def held_out_scores(run, prompts, references, samples):
    """
    Continuous endpoints of an evaluation, from its pass@1 samples (evaluation.evaluate's scorer), summed per token:
    "held_out_kl", the student's exact reverse KL to the teacher at every token of its own samples of the held-out
    problems (E1 on held-out prompts: OPD's own objective, so lower means the loss did its job, not that answers are
    right), and "reference_logprob", its log-likelihood of the held-out worked solutions (and their EOS),
    teacher-forced. Rows with the reference None (FSDP's uncounted padding) run but are not counted, so every rank
    makes the same forwards. The embedded task only: with a real vocabulary, whole completions' logits do not fit.
    """
    cfg, student, tokenizer = run.cfg, run.student, run.tokenizer
    device, V, pad = next(student.parameters()).device, len(tokenizer), tokenizer.pad_token_id
    solutions = [tokenizer(r or "", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for r in references]
    rows = [(p, list(c), r is not None) for p, r, per_problem in zip(prompts, references, samples) for c in per_problem]
    rows += [(p, s, r is not None) for p, r, s in zip(prompts, references, solutions)]
    kinds = ["held_out_kl"] * (len(rows) - len(prompts)) + ["reference_logprob"] * len(prompts)
    sums = {"held_out_kl": [0.0, 0], "reference_logprob": [0.0, 0]}
    was_training = student.training
    student.eval()
    for start in range(0, len(rows), cfg.eval_batch_size):
        batch, kind = rows[start:start + cfg.eval_batch_size], kinds[start:start + cfg.eval_batch_size]
        input_ids, prompt_mask = evaluation.left_padded([p for p, _, _ in batch], pad, device)
        N = max(1, max(len(c) for _, c, _ in batch))
        tokens = torch.tensor([c + [pad] * (N - len(c)) for _, c, _ in batch], device=device)
        counted = torch.tensor([[k and i < len(c) for i in range(N)] for _, c, k in batch], device=device)
        mask = torch.cat([prompt_mask, torch.tensor([[1] * len(c) + [0] * (N - len(c)) for _, c, _ in batch],
                                                    device=device)], 1)
        sequences, P = torch.cat([input_ids, tokens], 1), input_ids.shape[1]
        with models.autocast(cfg):
            with run.runtime.gathered(run.teacher):
                teacher_out = forward_completions(run.teacher, sequences, mask, P, V, False)
            student_out = forward_completions(student, sequences, mask, P, V, False)
        student_out, teacher_out = (trb.canonicalise_eos(x.float(), run.eos_ids) for x in (student_out, teacher_out))
        for name in sums:
            rows_of = counted & torch.tensor([k == name for k in kind], device=device)[:, None]
            if name == "held_out_kl":
                value = trb.topk_reverse_kl(student_out[rows_of], teacher_out[rows_of], 0).sum()
            else:
                value = torch.log_softmax(student_out, -1).gather(-1, tokens[..., None]).squeeze(-1)[rows_of].sum()
            sums[name][0] += float(value)
            sums[name][1] += int(rows_of.sum())
    student.train(was_training)
    return {name: tuple(pair) for name, pair in sums.items()}


OUTPUTS = {"metrics.jsonl": "loss, budget, beta, KL, teacher log-prob and pass@1, one row per step",
           "samples.jsonl": "greedy completions of the shown held-out problems at every evaluation, the teacher's once",
           "summary.json": "the numbers below and the config",
           "run_config.yaml": "every config key as the run resolved it (--config=this file repeats the run)",
           "checkpoints": "the newest checkpoints (--resume=true continues from the last one that loads)",
           "student": "the distilled student (from_pretrained loads it)"}


def print_summary(cfg, argv, fsdp=False):
    """The main job's last lines: where the outputs are, teacher and student pass@1, the wall time and the next command
    worth trying: the comparison with vanilla OPD on the same overrides (run.sh sets TRB_LAUNCH to itself), or under
    FSDP the evaluation of the run's checkpoints."""
    out = Path(cfg.out_dir)
    summary = json.loads((out / "summary.json").read_text())
    minutes, seconds = divmod(round(summary["wall_s"]), 60)
    teacher = f"{summary['teacher']['pass@1']:.3f}" if summary["teacher"] else "not measured (real models)"
    print(f"\ndone in {minutes}:{seconds:02d} (wall time). Outputs in {out}/:")
    for name, what in OUTPUTS.items():
        path = out / name
        if path.is_dir() or (path.exists() and path.stat().st_size):  # samples.jsonl is empty with shown_problems 0
            print(f"  {name + ('/' if path.is_dir() else ''):15s} {what}")
    print(f"held-out pass@1: teacher {teacher}; student {summary['initial_pass@1']:.3f} at step 0 -> "
          f"{summary['final_pass@1']:.3f} at step {summary['steps']} ({cfg.method})")
    if fsdp:
        print(f"next, every checkpoint on a benchmark suite, the best one named:\n"
              f"  python -m scripts.evaluate --run={out} --suite=configs/eval/quick.yaml")
        return
    same = [arg for arg in argv if not arg.startswith(("--out_dir=", "--resume=", "--overwrite=", "--method=",
                                                        "--seed="))]
    launch = os.environ.get("TRB_LAUNCH", "python train_small.py")
    runs = 2 * len(cfg.seeds.split(","))
    print(f"next, TRB against vanilla OPD over seeds {cfg.seeds} ({runs} runs like this one):\n"
          f"  {launch} {shlex.join(['--compare=opd,trb', '--out_dir=runs/compare', *same])}")


def stopped(stop, launch, argv):
    """The last line of a run that a signal stopped (checkpoints.Interrupted): the step, its checkpoint and the exact
    command that continues it; then the exit, with code 128 + the signal's number."""
    again = shlex.join([arg for arg in argv if not arg.startswith(("--resume=", "--overwrite="))] + ["--resume=true"])
    if stop.step is None:  # a comparison: each run stopped on its own
        saved = "each interrupted run saved a checkpoint in its folder"
    else:
        saved = f"at step {stop.step}, " + (f"checkpoint {stop.checkpoint}" if stop.checkpoint else "nothing to save")
    print(f"stopped by {signal.Signals(stop.signum).name} ({saved}); continue with: {launch} {again}",
          file=sys.stderr, flush=True)
    sys.exit(128 + stop.signum)


def main():
    cfg = load_config(sys.argv[1:])
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep stderr to our own bars: teacher SFT, rollouts, distillation
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        if cfg.compare:
            compare.compare(cfg, train, score_alone)
        else:
            train(cfg)
            print_summary(cfg, sys.argv[1:])
    except checkpoints.Interrupted as stop:
        stopped(stop, os.environ.get("TRB_LAUNCH", "python train_small.py"), sys.argv[1:])


if __name__ == "__main__":
    main()
