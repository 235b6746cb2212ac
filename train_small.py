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
    python train_small.py --config=configs/gsm8k_1gpu.yaml                 # Qwen3-0.6B-Base <- Qwen3-4B on GSM8K, one GPU

Read top-down: data and models, the hooks where train_fsdp.py differs, the training step, evaluation, the loop.
Elsewhere: config.py (every key, its type, check and meaning), synthetic_task.py (the embedded offline task and its
cached teacher and student), math_data.py (real datasets, answer checking), checkpoints.py (atomic checkpoints,
resume), compare.py (--compare over seeds).
"""
import copy
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import math_data
import synthetic_task
import trb
from config import die, load_config

# ------------------------------------------------------------------------------------------------------------------
# Data: the embedded synthetic task or a real dataset, answer checking, prompts.


def load_splits(cfg, tokenizer=None, verbose=True):
    """
    (train, held-out) datasets, the embedded task's or a real dataset's: "question" (and, held out, "answer") fields.
    Rows whose prompt (format_prompt, tokenized as encode_prompts does) is longer than max_prompt_tokens are dropped,
    with a printed count (verbose): one long prompt would widen every row of its decode call, past the memory plan.
    """
    train, held_out = synthetic_task.splits(cfg) if cfg.dataset == "synthetic" else math_data.load_splits(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg)
    held_out_key = "eval_dataset" if cfg.eval_dataset else "dataset"
    return (drop_long_prompts(train, tokenizer, cfg, "dataset", "training", verbose),
            drop_long_prompts(held_out, tokenizer, cfg, held_out_key, "held-out", verbose))


def drop_long_prompts(rows, tokenizer, cfg, key, what, verbose):
    """The rows whose formatted prompt has at most max_prompt_tokens tokens; stops with one line if none has."""
    prompts = [format_prompt(q, tokenizer, cfg) for q in rows["question"]]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=not tokenizer.chat_template)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_tokens]
    if not keep:
        die(f"max_prompt_tokens: all {len(rows)} {what} prompts of {key} {getattr(cfg, key)!r} are longer than "
            f"{cfg.max_prompt_tokens} tokens (the shortest has {min(lengths, default=0)})")
    if len(keep) < len(rows):
        if verbose:
            print(f"{key}: dropped {len(rows) - len(keep)} of {len(rows)} {what} prompts over max_prompt_tokens="
                  f"{cfg.max_prompt_tokens} (the longest has {max(lengths)} tokens)")
        rows = rows.select(keep)
    return rows


def format_prompt(question, tokenizer, cfg):
    """Synthetic task: the question itself. Real data: the paper's system prompt, via the chat template if any (Qwen3's
    reads enable_thinking: off, it appends an empty think block)."""
    if cfg.dataset == "synthetic":
        return question
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=cfg.enable_thinking)
    return f"{cfg.system_prompt}\n\n{question}\n"


def encode_prompts(prompts, tokenizer, device):
    """Left-padded prompt batch: input_ids, attention_mask (B, P)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


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
# Models: the synthetic teacher and student (trained and cached on first use), or any Hugging Face causal LM.


def device_and_dtype(cfg):
    """The device, and the compute dtype of forward passes (autocast; the student's weights stay float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def load_pretrained(key, name, cfg, dtype):
    """A hub name or local folder as a causal LM; any loading failure is one line naming the key."""
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), dtype=dtype,
                                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        die(f"{key}: cannot load {name!r}: {str(error).splitlines()[0]}")


def load_tokenizer(cfg):
    """The student's tokenizer (the embedded task's character tokenizer), left-padded, checked against the teacher's."""
    if cfg.student == "synthetic":
        return synthetic_task.char_tokenizer()
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.student),
                                                  trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        die(f"student: cannot load a tokenizer from {cfg.student!r}: {str(error).splitlines()[0]}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        trb.check_same_vocab(tokenizer, AutoTokenizer.from_pretrained(os.path.expanduser(cfg.teacher),
                                                                      trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError) as error:
        die(f"teacher: {str(error).splitlines()[0]}")
    return tokenizer


def load_models(cfg, train, held_out, tokenizer=None):
    """(tokenizer, student, teacher, teacher_scores). Teacher frozen: eval mode, no grad."""
    device, dtype = device_and_dtype(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg)
    if cfg.student == "synthetic":
        score = lambda model: evaluate(model, tokenizer, held_out, cfg, seed=cfg.data_seed)
        teacher, teacher_scores = synthetic_task.teacher(cfg, tokenizer, train, score)
        student = synthetic_task.student(cfg, tokenizer, train)
    else:
        student = load_pretrained("student", cfg.student, cfg, torch.float32)
        teacher, teacher_scores = load_pretrained("teacher", cfg.teacher, cfg, dtype), None
    teacher.requires_grad_(False)
    for model in (student, teacher):
        contiguous_head_input(model)
    if cfg.activation_checkpointing:  # per decoder layer; active in train mode only, i.e. in the loss forwards
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # float32 master weights for the student: AdamW steps of lr 1e-5 vanish in bf16 rounding; compute runs in `dtype`
    return (tokenizer, student.to(device, torch.float32), to_compute_dtype(teacher.to(device), dtype).eval(),
            teacher_scores)


def to_compute_dtype(model, dtype):
    """
    model with its parameters and buffers cast to dtype, except the rotary embeddings' buffers, which stay float32 as
    from_pretrained(dtype=...) leaves them. nn.Module.to(dtype) would round Qwen3's inv_freq to bf16 too: a relative
    frequency error up to 3.7e-3, i.e. a phase error of ~2.4 rad at position 2048, in every attention score.
    """
    rotary = [(module, name, buffer) for module in model.modules() if "Rotary" in type(module).__name__
              for name, buffer in module._buffers.items() if buffer is not None]
    model.to(dtype)
    for module, name, buffer in rotary:
        module._buffers[name] = buffer.to(torch.float32)  # the float32 values as they were, not rounded and back
    return model


def contiguous_head_input(model):
    """
    Gives the output head's input standard strides. With logits_to_keep=1 (every prefill, the loss's hidden-state
    forwards) the head gets the last position of a (B, T, H) hidden state, a strided view; torch.matmul cannot fold
    that into one matrix product (even for B = 1, which is_contiguous() accepts) and multiplies per row by a (B, H, V)
    copy of the head instead (18.5 GiB for the 8B teacher's prefill of 16 rows), unless the head's weight needs a
    gradient. Copying the (B, 1, H) input costs B x H.
    """
    model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: tuple(a.clone(memory_format=torch.contiguous_format) if torch.is_tensor(a) else a
                                   for a in args))


MOMENT = "memory moment: "


@contextmanager
def moment(name):
    """A torch.profiler range named after one of memory_plan's moments (memory_plan.measure reads the peak inside);
    as a decorator, a new range per call."""
    with torch.profiler.record_function(MOMENT + name):
        yield


def autocast(cfg):
    """Mixed precision for forwards and rollouts when the compute dtype is not float32 (bf16 on GPU by default)."""
    device, dtype = device_and_dtype(cfg)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def stop_token_ids(tokenizer, *models):
    """The student tokenizer's EOS first (the one emitted), then every other EOS id of the models (Qwen3-Base and
    chat models differ): trb merges them into one stop event (docs/method.md section 4)."""
    ids = []
    for model in models:
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids += eos if isinstance(eos, list) else [eos]
    return [tokenizer.eos_token_id] + sorted({i for i in ids if i is not None} - {tokenizer.eos_token_id})


# ------------------------------------------------------------------------------------------------------------------
# Where train_fsdp.py differs. train() and train_step() call these hooks wherever several processes would have to
# cooperate; on one device each is trivial. train_fsdp.py's subclass overrides them, and that is all it changes.


class SingleDevice:
    """train_small.py's hooks: one process, all rows, nothing to gather or reduce."""
    rank, world = 0, 1

    def __init__(self, cfg=None):
        self.dtype = device_and_dtype(cfg)[1] if cfg is not None else torch.float32
        # blended_generate's decoding options: tokens between "all done?" checks, KV cache kind, compiled step
        self.decoding = (trb.Decoding(stop_check_every=cfg.stop_check_every, cache=cfg.cache, compile=cfg.compile)
                         if cfg is not None else trb.Decoding())
        self._decoding_copy = None

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

    @torch.no_grad()
    def for_decoding(self, student):
        """
        The student as rollouts and evaluation run it. With a bf16 compute dtype: a bf16 copy of the float32 master
        weights, refreshed on every call (2 bytes per parameter). Under autocast the float32 model itself would keep
        float32 keys in its KV cache (RMSNorm's float32 weight upcasts them), twice the memory. FSDP: the model
        itself, whose mixed-precision parameters are bf16 already.
        """
        if self.dtype == torch.float32:
            return student
        if self._decoding_copy is None:
            self._decoding_copy = to_compute_dtype(copy.deepcopy(student), self.dtype).eval().requires_grad_(False)
        for target, source in zip(self._decoding_copy.parameters(), student.parameters()):
            target.copy_(source)
        return self._decoding_copy

    def sync_gradients(self, student, last):
        """Called before each micro-batch's backward: whether to reduce gradients now (FSDP: on the last only)."""

    def all_finished(self, done):
        """The rollout's stop rule given this process's done rows (FSDP: every rank decodes the same steps)."""
        return bool(done.all())

    def sum(self, values):
        """A list of numbers summed over processes (FSDP: all-reduce)."""
        return list(values)

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

    def save_checkpoint(self, out_dir, step, student, optimizer, generator, keep):
        checkpoints.save_checkpoint(out_dir, step, student, optimizer, generator, keep)

    def load_checkpoint(self, path, student, optimizer, generator, cfg):
        return checkpoints.load_checkpoint(path, student, optimizer, generator, cfg.trust_remote_code)

    def export(self, student, tokenizer, path, eos_ids):
        """The final student as a plain Hugging Face folder (safetensors) that from_pretrained loads, which stops
        `generate` (or vLLM) at every stop id it was trained with."""
        with_stop_ids(student, eos_ids, tokenizer.pad_token_id).save_pretrained(path)
        tokenizer.save_pretrained(path)


def with_stop_ids(model, eos_ids, pad_token_id):
    """The model with generation_config.eos_token_id = all of eos_ids: training merged them into one stop event
    (a Base student's <|endoftext|> and a chat teacher's <|im_end|>), so the exported model must stop at each."""
    from transformers import GenerationConfig
    config = copy.deepcopy(model.generation_config) if model.generation_config is not None else GenerationConfig()
    config.eos_token_id, config.pad_token_id = list(eos_ids), pad_token_id
    model.generation_config = config
    return model


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


def rollouts(student, teacher, input_ids, attention_mask, rows_per_call, runtime, **kwargs):
    """
    trb.blended_generate over (B, P) prompts, `rows_per_call` rows per call (0 = all at once; it bounds the two KV
    caches), with the parameters gathered once for all the calls; the parts are right-padded to the longest and joined.
    """
    rows_per_call = rows_per_call or input_ids.shape[0]
    with runtime.gathered(student, teacher):
        parts = [trb.blended_generate(student, teacher, input_ids[i:i + rows_per_call],
                                      attention_mask[i:i + rows_per_call], all_finished=runtime.all_finished,
                                      decoding=runtime.decoding, **kwargs)
                 for i in range(0, input_ids.shape[0], rows_per_call)]
    return trb.Rollout.cat(parts, kwargs.get("pad_token_id"))


def forward_completions(model, sequences, mask, P, V, hidden):
    """
    Logits (B, N, V) or last hidden states (B, N, H) at the positions that predict the N completion tokens, and
    nothing else kept: no KV cache, no per-layer hidden states (2.5 GB per 8k-token row of an 8B teacher).
    """
    inputs = dict(input_ids=sequences, attention_mask=mask, position_ids=trb.position_ids(mask), use_cache=False)
    if not hidden:
        return model(**inputs).logits[:, P - 1:-1, :V]
    # The final norm's output, caught on its way out of the decoder, through the root forward (not the decoder
    # alone) so that FSDP's root hooks gather embeddings, norm and head; the head then multiplies one position only.
    caught = []
    handle = model.get_decoder().register_forward_hook(lambda module, args, out: caught.append(out[0]))
    try:
        model(**inputs, logits_to_keep=1)
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
    teacher_logits (B, N, V): the diagnostics of docs/method.md section 7, for every method (even when the rollout did not
    run the teacher)."""
    log_pt = torch.log_softmax(teacher_logits.float(), -1)  # (B, N, V)
    logprob = log_pt.gather(-1, tokens[..., None])[..., 0][mask].sum().item()
    entropy = -(log_pt.exp() * log_pt.nan_to_num(neginf=0.0)).sum(-1)[mask].sum().item()
    return logprob, entropy


def train_step(student, teacher, tokenizer, optimizer, questions, step, cfg, generator, eos_ids, runtime):
    """
    One OPD update on `questions` (under FSDP: this rank's share of the step's prompts). The loss of each micro-batch
    is its sum of per-token KL divided by the completion tokens of the whole step (all ranks), so neither rollout
    batching, micro-batching nor the number of ranks changes the update.
    """
    device = next(student.parameters()).device
    V = len(tokenizer)  # shared tokenizer range: heads may be wider (padded vocab)
    started = time.time()
    kwargs = trb.behavior(cfg.method, step, cfg)  # eps from kl_budget (E5), temperature, token rule of `method`
    prompts = [format_prompt(q, tokenizer, cfg) for q in questions]
    input_ids, prompt_mask = (x.repeat_interleave(cfg.rollouts_per_prompt, 0)  # (B, P), B = prompts * rollouts
                              for x in encode_prompts(prompts, tokenizer, device))
    B, P = input_ids.shape
    # 1) rollouts from the behavior policy (the teacher decodes in lockstep only when the policy needs it)
    student.eval()
    with autocast(cfg), moment("rollout peak"):
        rollout = rollouts(runtime.for_decoding(student), teacher if trb.behavior_needs_teacher(kwargs) else None,
                           input_ids, prompt_mask,
                           cfg.rollout_batch_size, runtime, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids,
                           pad_token_id=tokenizer.pad_token_id, generator=generator, vocab_size=V, **kwargs)
    mask = torch.cat([prompt_mask, rollout.completion_mask.long()], 1)  # (B, P+N)
    stats = rollout.stats()
    total_tokens = runtime.sum([stats["completion_tokens"]])[0]  # completion tokens of the whole step
    # 2) micro-batches of rows: teacher and student forwards on the sampled sequences (the rollout is data)
    student.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = logprob_sum = entropy_sum = 0.0
    micro = cfg.micro_batch_size or B
    for start in range(0, B, micro):
        sequences, row_mask, completion_mask, p = trimmed(rollout, mask, slice(start, start + micro), P)
        runtime.sync_gradients(student, last=start + micro >= B)
        with autocast(cfg), moment("loss forward"):
            with torch.no_grad(), runtime.gathered(teacher):
                teacher_out = forward_completions(teacher, sequences, row_mask, p, V, cfg.chunked_loss)
                teacher_head = runtime.head_weight(teacher, V) if cfg.chunked_loss else None
            student_out = forward_completions(student, sequences, row_mask, p, V, cfg.chunked_loss)
            # 3) E1: reverse KL to the teacher at every completion token, with one stop event as in the rollout
            if cfg.chunked_loss:
                loss = trb.chunked_opd_loss(student_out, runtime.head_weight(student, V), teacher_out, teacher_head,
                                            completion_mask, chunk_size=cfg.loss_chunk_size, topk=cfg.loss_topk,
                                            eos_ids=eos_ids)
            else:
                student_out, teacher_out = (trb.canonicalise_eos(x, eos_ids) for x in (student_out, teacher_out))
                loss = trb.opd_loss(student_out, teacher_out, completion_mask, topk=cfg.loss_topk)
                # the teacher's view of the visited tokens for every method, from this forward
                logprob, entropy = teacher_view_sums(teacher_out, sequences[:, p:], completion_mask)
                logprob_sum, entropy_sum = logprob_sum + logprob, entropy_sum + entropy
        # opd_loss is a mean over this micro-batch's tokens: make it their sum / the step's tokens, so the accumulated
        # gradients are the full batch's. Backward of loss * world: FSDP's reduce-scatter averages over ranks.
        loss = loss * (int(completion_mask.sum()) / max(total_tokens, 1))
        with moment("loss backward"):
            (loss * runtime.world).backward()
        loss_sum += loss.item()
    # 4) AdamW step with grad-norm clipping, lr from the warmup schedule
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    with moment("optimizer step"):
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        optimizer.step()
    # Metrics: token means over the whole step (sums over ranks); NaN where the teacher did not run.
    names = ("beta", "realised_kl", "replaced_frac", "teacher_logprob", "teacher_entropy")
    n = stats["completion_tokens"]
    sums = [stats[k] * n if n else 0.0 for k in names]
    if not cfg.chunked_loss:
        sums[3:] = [logprob_sum, entropy_sum]
    loss, *sums = runtime.sum([loss_sum, *sums])
    return {"step": step + 1, "loss": loss, "eps": kwargs["eps"], "temperature": kwargs["temperature"],
            **{k: s / total_tokens if total_tokens else math.nan for k, s in zip(names, sums)},
            "completion_tokens": int(total_tokens), "grad_norm": grad_norm.item(), "lr": lr_at(step, cfg),
            "tokens_per_s": total_tokens / (time.time() - started)}


# ------------------------------------------------------------------------------------------------------------------
# Evaluation: held-out pass@1 of the student alone.


@torch.no_grad()
@moment("evaluation peak")
def evaluate(model, tokenizer, held_out, cfg, seed, eos_ids=None, runtime=None):
    """
    Held-out pass@1 = mean over problems of c/n (n = eval_samples at eval_temperature), and greedy accuracy, decoding
    eval_batch_size rows per call up to eval_max_new_tokens. Answers are checked with math-verify on real data and by
    exact match on the embedded task. Under FSDP each rank decodes its share of the problems in lockstep with the
    others (the same number of calls, each stopping when every rank's rows are done; a rank with fewer problems pads
    its last call with uncounted ones), so no rank waits for another longer than stop_check_every tokens take; the
    counts are summed.
    """
    runtime = runtime or SingleDevice(cfg)
    device = next(model.parameters()).device
    eos_ids = eos_ids or [tokenizer.eos_token_id]
    generator = torch.Generator(device).manual_seed(seed)  # own generator: evaluation never shifts training RNG
    was_training = model.training
    model.eval()
    per_rank = -(-len(held_out) // runtime.world)  # every rank decodes as many problems as the largest share
    mine = list(range(len(held_out)))[runtime.share(len(held_out))]
    rows = [(i, True) for i in mine] + [(0, False)] * (per_rank - len(mine))  # (problem, counted)
    all_questions, answers = list(held_out["question"]), list(held_out["answer"])
    questions = [format_prompt(all_questions[i], tokenizer, cfg) for i, _ in rows]
    exact = cfg.dataset == "synthetic"
    correct = {}
    with runtime.gathered(model):
        for name, n, temperature in (("pass@1", cfg.eval_samples, cfg.eval_temperature), ("greedy", 1, 0.0)):
            per_call = max(1, cfg.eval_batch_size // n)  # problems per call: n * per_call <= eval_batch_size rows
            correct[name] = 0
            for i in tqdm(range(0, len(rows), per_call), desc=f"eval rollouts ({name})", leave=False):
                batch = encode_prompts(questions[i:i + per_call], tokenizer, device)
                input_ids, mask = (x.repeat_interleave(n, 0) for x in batch)  # (n * problems, P)
                with autocast(cfg):
                    rollout = trb.blended_generate(model, None, input_ids, mask, eps=0.0,
                                                   max_new_tokens=cfg.eval_max_new_tokens, temperature=temperature,
                                                   eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                                   generator=generator, vocab_size=len(tokenizer),
                                                   all_finished=runtime.all_finished, decoding=runtime.decoding)
                texts = tokenizer.batch_decode(rollout.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
                for j, text in enumerate(texts):
                    problem, counted = rows[i + j // n]
                    correct[name] += counted and math_data.is_correct(text, answers[problem], exact)
    model.train(was_training)
    pass_correct, greedy_correct = runtime.sum([correct["pass@1"], correct["greedy"]])
    return {"pass@1": pass_correct / (cfg.eval_samples * len(held_out)), "greedy": greedy_correct / len(held_out)}


@torch.no_grad()
@moment("evaluation peak")
def sample_completions(model, tokenizer, held_out, cfg, eos_ids, runtime):
    """
    Greedy completions of the first shown_problems held-out problems, the same ones at every evaluation so that a
    reader sees the text change: one dict per problem (problem index, question, prompt, reference answer, completion,
    correct). Every rank decodes all of them (FSDP: the same calls in lockstep); the main process writes them out.
    """
    problems = [held_out[i] for i in range(min(cfg.shown_problems, len(held_out)))]
    prompts = [format_prompt(row["question"], tokenizer, cfg) for row in problems]
    input_ids, mask = encode_prompts(prompts, tokenizer, next(model.parameters()).device)  # (k, P)
    was_training = model.training
    model.eval()  # also keeps the KV cache on with activation checkpointing (a train-mode feature)
    with autocast(cfg):
        rollout = rollouts(model, None, input_ids, mask, cfg.eval_batch_size, runtime, eps=0.0, temperature=0.0,
                           max_new_tokens=cfg.eval_max_new_tokens, eos_token_id=eos_ids,
                           pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    model.train(was_training)
    texts = tokenizer.batch_decode(rollout.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
    return [{"problem": i, "question": row["question"], "prompt": prompt,
             "answer": math_data.reference_answer(row["answer"]), "completion": text,
             "correct": bool(math_data.is_correct(text, row["answer"], cfg.dataset == "synthetic"))}
            for i, (row, prompt, text) in enumerate(zip(problems, prompts, texts))]


def one_line(text, width=100):
    """text on one line (newlines shown as \\n), cut in the middle to at most `width` characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else f"{text[:width // 2 - 2]} .. {text[-(width // 2 - 2):]}"


def log_samples(path, step, model_name, samples):
    """Appends one samples.jsonl row per shown problem and prints them, one line each."""
    with open(path, "a") as log:
        log.writelines(json.dumps({"step": step, "model": model_name, **s}) + "\n" for s in samples)
    tqdm.write(f"step {step}, {model_name}'s greedy completions ({path.name}):")
    for s in samples:
        verdict = "right" if s["correct"] else f"wrong (answer {s['answer']})"
        tqdm.write(f"  #{s['problem']} {one_line(s['question'], 40)} -> {one_line(s['completion'])}   {verdict}")


# ------------------------------------------------------------------------------------------------------------------
# The training run.


def first_line(error):
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def resume_from(found, student, optimizer, generator, cfg, runtime):
    """
    (checkpoint, step): the newest of the complete checkpoints `found` that loads into the student, AdamW and the
    RNGs, or (None, 0) if there are none. One that fails to load (a truncated file, say) is named in a warning line
    and the one before it is tried; loading it overwrites whatever the failed load applied. Under FSDP every rank
    tries each checkpoint and the ranks move on together. If none loads the run stops: starting fresh instead would
    silently throw the run away.
    """
    for i in reversed(range(len(found))):
        try:
            step, problem = runtime.load_checkpoint(found[i], student, optimizer, generator, cfg), None
        except Exception as error:  # any failure to read or apply it: damaged, truncated, of another model
            step, problem = 0, first_line(error)
        if runtime.everywhere(problem is None):
            if runtime.is_main:
                print(f"resumed from {found[i]}")
            return found[i], step
        if runtime.is_main:
            then = "trying the one before it" if i else "there is none before it"
            print(f"warning: checkpoint {found[i]} cannot be loaded ({problem or 'it failed on another rank'}); "
                  f"{then}", file=sys.stderr, flush=True)
    if found:
        runtime.stop(f"resume: none of the {len(found)} checkpoints in {found[0].parent} can be loaded (see the "
                     f"warnings above); to start over instead, --resume=false --overwrite=true")
    return None, 0


def train(cfg, runtime=None):
    """One distillation run; the main process writes metrics.jsonl, summary.json and the final student to out_dir."""
    runtime = runtime or SingleDevice(cfg)
    if cfg.batch_size % runtime.world:  # unequal shares would mean unequal collectives, i.e. a hang
        die(f"batch_size: {cfg.batch_size} prompts do not split evenly over {runtime.world} ranks")
    started = time.time()
    out = Path(cfg.out_dir)
    # Before any model loads: a fresh run never deletes an earlier run's checkpoints unless overwrite says so. Every
    # rank reads out_dir (one shared folder) and they agree before any stops or tries a checkpoint.
    refused = checkpoints.fresh_run_refused(out, cfg.resume, cfg.overwrite)
    found = checkpoints.complete_checkpoints(out) if cfg.resume else []
    same = runtime.sum([len(found)])[0] == runtime.world * len(found)  # every rank sees as many checkpoints
    if not runtime.everywhere(refused is None and same):
        runtime.stop(refused or f"out_dir: the ranks see different checkpoints in {out} (it must be one folder "
                                f"that all of them share)")
    if cfg.resume and not found and runtime.is_main:
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting fresh")
    random.seed(cfg.seed)
    # FSDP, embedded task: rank 0 trains and caches the synthetic models, the others then load them. Real models:
    # every rank loads at once (the hub's file locks make one of them download), so no rank waits in a collective.
    with runtime.main_first() if cfg.student == "synthetic" else nullcontext():
        tokenizer = load_tokenizer(cfg)
        train_split, held_out = load_splits(cfg, tokenizer, verbose=runtime.is_main)
        tokenizer, student, teacher, teacher_scores = load_models(cfg, train_split, held_out, tokenizer)
    student, teacher = runtime.prepare(student, teacher)
    device = next(student.parameters()).device
    eos_ids = stop_token_ids(tokenizer, student, teacher)
    generator = torch.Generator(device).manual_seed(cfg.seed + runtime.rank)  # the rollout sampler's RNG
    optimizer = make_optimizer(student, cfg)
    checkpoint, start = resume_from(found, student, optimizer, generator, cfg, runtime)
    history = []  # on resume: the rows logged up to the checkpoint (later ones and a half-written line are dropped)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:  # a fresh run (no checkpoints here, or overwrite): never resumed into an earlier one
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        else:
            history = checkpoints.read_log(out / "metrics.jsonl", start)
        checkpoints.rewrite_log(out / "metrics.jsonl", history)
        checkpoints.rewrite_log(out / "samples.jsonl",  # cut back the same way; emptied by a fresh run
                                checkpoints.read_log(out / "samples.jsonl", start) if checkpoint is not None else [])

    def show(model, name, step):  # the shown problems' greedy completions, to samples.jsonl and stdout
        if cfg.shown_problems:
            samples = sample_completions(model, tokenizer, held_out, cfg, eos_ids, runtime)
            if runtime.is_main:
                log_samples(out / "samples.jsonl", step, name, samples)

    def evaluate_at(step):
        model = runtime.for_decoding(student)
        show(model, "student", step)
        return evaluate(model, tokenizer, held_out, cfg, cfg.seed + step, eos_ids, runtime)

    with open(out / "metrics.jsonl", "a") if runtime.is_main else nullcontext() as log:
        def record(row):
            history.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if "pass@1" in row and runtime.is_main:
                tqdm.write(f"step {row['step']}: pass@1 {row['pass@1']:.3f} greedy {row['greedy']:.3f}")

        if start == 0:
            show(teacher, "teacher", 0)  # once: the text the student is distilled towards
            record({"step": 0, "eps": trb.behavior(cfg.method, 0, cfg)["eps"], "beta": 0.0, **evaluate_at(0)})
        ranks = f" x{runtime.world}" if runtime.world > 1 else ""
        bar = tqdm(range(start, cfg.max_steps), desc=f"distill {cfg.method} seed {cfg.seed}{ranks}", initial=start,
                   total=cfg.max_steps, disable=not runtime.is_main)
        for step in bar:
            questions = train_questions(train_split, step, cfg)[runtime.share(cfg.batch_size)]
            row = train_step(student, teacher, tokenizer, optimizer, questions, step, cfg, generator, eos_ids, runtime)
            if (cfg.eval_every and row["step"] % cfg.eval_every == 0) or row["step"] == cfg.max_steps:
                row.update(evaluate_at(row["step"]))
            record(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", eps=f"{row['eps']:.3f}", beta=f"{row['beta']:.3f}")
            if cfg.checkpoint_every and row["step"] % cfg.checkpoint_every == 0:
                runtime.save_checkpoint(out, row["step"], student, optimizer, generator, cfg.keep_checkpoints)
    runtime.export(student, tokenizer, out / "student", eos_ids)
    if runtime.is_main:
        evals = [row for row in history if "pass@1" in row]
        best = max(evals, key=lambda row: row["pass@1"])
        summary = {"method": cfg.method, "seed": cfg.seed, "steps": cfg.max_steps, "world_size": runtime.world,
                   "initial_pass@1": evals[0]["pass@1"], "final_pass@1": evals[-1]["pass@1"],
                   "final_greedy": evals[-1]["greedy"], "best_pass@1": best["pass@1"], "best_step": best["step"],
                   "teacher": teacher_scores, "wall_s": round(time.time() - started, 1),
                   "config": dataclasses.asdict(cfg)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return history


OUTPUTS = {"metrics.jsonl": "loss, budget, beta, KL, teacher log-prob and pass@1, one row per step",
           "samples.jsonl": "greedy completions of the shown held-out problems at every evaluation, the teacher's once",
           "summary.json": "the numbers below and the config",
           "checkpoints": "the newest checkpoints (--resume=true continues from the last one that loads)",
           "student": "the distilled student (from_pretrained loads it)"}


def print_summary(cfg, argv):
    """The main job's last lines: where the outputs are, teacher and student pass@1, the wall time and the next command
    worth trying, the comparison with vanilla OPD on the same overrides (run.sh sets TRB_LAUNCH to itself)."""
    out = Path(cfg.out_dir)
    summary = json.loads((out / "summary.json").read_text())
    minutes, seconds = divmod(round(summary["wall_s"]), 60)
    teacher = f"{summary['teacher']['pass@1']:.3f}" if summary["teacher"] else "not measured (real models)"
    same = [arg for arg in argv if not arg.startswith(("--out_dir=", "--resume=", "--overwrite=", "--method=",
                                                        "--seed="))]
    launch = os.environ.get("TRB_LAUNCH", "python train_small.py")
    runs = 2 * len(cfg.seeds.split(","))
    print(f"\ndone in {minutes}:{seconds:02d} (wall time). Outputs in {out}/:")
    for name, what in OUTPUTS.items():
        path = out / name
        if path.is_dir() or (path.exists() and path.stat().st_size):  # samples.jsonl is empty with shown_problems 0
            print(f"  {name + ('/' if path.is_dir() else ''):15s} {what}")
    print(f"held-out pass@1: teacher {teacher}; student {summary['initial_pass@1']:.3f} at step 0 -> "
          f"{summary['final_pass@1']:.3f} at step {summary['steps']} ({cfg.method})")
    print(f"next, TRB against vanilla OPD over seeds {cfg.seeds} ({runs} runs like this one):\n"
          f"  {launch} {shlex.join(['--compare=opd,trb', '--out_dir=runs/compare', *same])}")


def main():
    cfg = load_config(sys.argv[1:])
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep stderr to our own bars: teacher SFT, rollouts, distillation
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.compare:
        import compare
        compare.compare(cfg, train)
    else:
        train(cfg)
        print_summary(cfg, sys.argv[1:])


if __name__ == "__main__":
    main()
