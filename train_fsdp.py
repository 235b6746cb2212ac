"""
On-policy distillation with TRB (arXiv 2605.31159) at full size: train_small.py under torchrun with PyTorch FSDP2.

The training step, losses, data, evaluation and config are train_small.py's and trb.py's; this file adds only the
distributed part: the process group, `fully_shard` (each decoder layer, then the root), each rank's shard of the
prompts, rollouts with the parameters gathered once, the loss normalised by the global token count, sharded
`torch.distributed.checkpoint` (DCP) checkpoints and rank-0 logging. Read it side by side with train_small.py.

Launch (same config.yaml and --key=value overrides as train_small.py; NCCL on GPUs, gloo on CPU):
    torchrun --standalone --nproc_per_node=2 train_fsdp.py --max_steps=20         # CPU smoke run (synthetic task)
    torchrun --standalone --nproc_per_node=8 train_fsdp.py --student=Qwen/Qwen3-1.7B-Base --teacher=Qwen/Qwen3-8B \
        --dataset=<OpenThoughts3 prompts> --batch_size=64 --rollouts_per_prompt=4 --max_new_tokens=7168 \
        --lr=1e-5 --lr_warmup_steps=15 --chunked_loss=true --teacher_sharding=shard --rollout_batch_size=16 \
        --micro_batch_size=1
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=trb \
        train_fsdp.py ...                                                          # multi-node: same on every node

config.yaml keys that only this script reads: teacher_sharding (replicate | shard), rollout_batch_size (rows per
blended_generate call on a rank, bounding the KV caches) and micro_batch_size (rows per forward/backward on a rank).
"""
import dataclasses
import gc
import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if int(os.environ.get("RANK", "0")) > 0:
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars on rank 0 only (read when tqdm is imported)

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import train_small as small
import trb

# ----------------------------------------------------------------------------------------------------------------
# Process group and sharding.


def init_distributed():
    """(rank, world_size, device) from torchrun's environment: NCCL with one GPU per process, else gloo on CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard_model(model, mp_policy=None):
    """FSDP2 as torchtitan does it: each decoder layer is one unit (one all-gather), then the root (embeddings,
    final norm, head; tied weights stay together there)."""
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)] if isinstance(model, FSDPModule) else []


@contextmanager
def gathered(*models):
    """
    Parameters all-gathered once on entry (one all-gather per FSDP unit) and kept while the block decodes, instead of
    an all-gather per layer per forward, i.e. per generated token; freed on exit, before the update. Inside, forward
    calls issue no collectives. Replicated (non-FSDP) models and None pass through.
    """
    modules = [m for model in models if model is not None for m in fsdp_modules(model)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for model in models:
            for m in fsdp_modules(model):
                m.reshard()
                m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's default: the root stays gathered


def all_ranks_finished(done):
    """
    blended_generate's stop rule under FSDP, and the one trap of lockstep decoding: a rank whose rows have all hit
    EOS must keep decoding (padding) until every rank's rows have, because each forward call of an FSDP module may
    all-gather, and a rank that stops early leaves the others waiting in that collective forever. MIN over ranks of
    "all my rows are done"; one 1-element all-reduce per token, far cheaper than the forwards.
    """
    flag = done.all().to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def generate(student, teacher, input_ids, attention_mask, behavior_kwargs, rows_per_call=0, **kwargs):
    """
    trb.blended_generate on this rank's rows (B, P), `rows_per_call` rows at a time (0 = all; bounds the two KV
    caches), with the parameters gathered once for all calls and every rank decoding the same number of steps. The
    teacher is gathered only when the behavior policy runs it. The parts are padded to the longest (masked out).
    """
    teacher = teacher if trb.behavior_needs_teacher(behavior_kwargs) else None
    rows_per_call = rows_per_call or input_ids.shape[0]
    with gathered(student, teacher):
        parts = [trb.blended_generate(student, teacher, input_ids[i:i + rows_per_call],
                                      attention_mask[i:i + rows_per_call], all_finished=all_ranks_finished,
                                      **behavior_kwargs, **kwargs) for i in range(0, input_ids.shape[0], rows_per_call)]
    if len(parts) == 1:
        return parts[0]
    width = max(part.beta.shape[1] for part in parts)  # N of the longest part

    def padded(part, name):  # right-pad the N columns with pad tokens, else 0 (False): all outside completion_mask
        x = getattr(part, name)
        value = (kwargs.get("pad_token_id") or 0) if name == "sequences" else 0
        return F.pad(x, (0, width - part.beta.shape[1]), value=value)

    return trb.Rollout(**{field.name: torch.cat([padded(part, field.name) for part in parts])
                          for field in dataclasses.fields(trb.Rollout)})


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks (float64, so token counts stay exact)."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def rank_slice(n, rank, world):
    """This rank's contiguous rows of a global batch of n (n divisible by world)."""
    return slice(rank * n // world, (rank + 1) * n // world)


# ----------------------------------------------------------------------------------------------------------------
# Distillation step: train_small.train_step on this rank's rows, with the loss summed over its tokens and divided by
# the global token count, so that the update equals single-process training on the whole batch.


def train_step(student, teacher, tokenizer, optimizer, questions, step, cfg, generator, eos_ids, rank, world):
    """One OPD update over the global batch `questions`; this rank rolls out and differentiates its own share."""
    device = next(student.parameters()).device
    V = len(tokenizer)
    started = time.time()
    # 1) rollouts of this rank's prompts, parameters gathered once, every rank decoding the same number of steps
    kwargs = trb.behavior(cfg.method, step, cfg)
    share = questions[rank_slice(len(questions), rank, world)]
    prompts = [small.format_prompt(q, tokenizer, cfg) for q in share]
    input_ids, prompt_mask = small.encode_prompts(prompts, tokenizer, device)
    input_ids = input_ids.repeat_interleave(cfg.rollouts_per_prompt, 0)  # (B, P), B = this rank's rollouts
    prompt_mask = prompt_mask.repeat_interleave(cfg.rollouts_per_prompt, 0)
    student.eval()
    rollout = generate(student, teacher, input_ids, prompt_mask, kwargs, cfg.rollout_batch_size,
                       max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                       generator=generator, vocab_size=V)
    P = input_ids.shape[1]
    mask = torch.cat([prompt_mask, rollout.completion_mask.long()], 1)  # (B, P+N)
    stats = rollout.stats()
    n = stats["completion_tokens"]
    total_tokens = all_reduce_sum([n], device)[0]  # completion tokens of the whole batch, all ranks
    # 2) + 3) micro-batches of rows: teacher and student forwards, E1 summed over tokens / global token count
    student.train()
    for group in optimizer.param_groups:
        group["lr"] = small.lr_at(step, cfg)
    optimizer.zero_grad(set_to_none=True)
    micro = cfg.micro_batch_size or input_ids.shape[0]
    loss_sum = logprob_sum = entropy_sum = 0.0
    for start in range(0, input_ids.shape[0], micro):
        rows = slice(start, start + micro)
        sequences, row_mask, completion_mask = rollout.sequences[rows], mask[rows], rollout.completion_mask[rows]
        with torch.no_grad(), gathered(teacher):
            teacher_out = small.forward_completions(teacher, sequences, row_mask, P, V, cfg.chunked_loss)
            teacher_head = teacher.get_output_embeddings().weight[:V] if cfg.chunked_loss else None
            if teacher_head is not None and isinstance(teacher, FSDPModule):
                teacher_head = teacher_head.clone()  # kept for the loss's backward; the gathered copy is freed
        student_out = small.forward_completions(student, sequences, row_mask, P, V, cfg.chunked_loss)
        if cfg.chunked_loss:  # the root's forward left the (tied) head gathered until its backward
            loss = trb.chunked_opd_loss(student_out, student.get_output_embeddings().weight[:V], teacher_out,
                                        teacher_head, completion_mask, chunk_size=cfg.loss_chunk_size,
                                        topk=cfg.loss_topk, eos_ids=eos_ids)
        else:
            student_out, teacher_out = (trb.canonicalise_eos(x, eos_ids) for x in (student_out, teacher_out))
            loss = trb.opd_loss(student_out, teacher_out, completion_mask, topk=cfg.loss_topk)
            logprob, entropy = small.teacher_view_sums(teacher_out, sequences[:, P:], completion_mask)
            logprob_sum, entropy_sum = logprob_sum + logprob, entropy_sum + entropy
        # opd_loss is a mean over this micro-batch's tokens: rescale it to (sum over them) / (tokens of all ranks),
        # then by world, because FSDP's reduce-scatter averages gradients over ranks (a sum / world). The reduced
        # gradient is then sum over every token of the batch / global token count: single-process training's.
        loss = loss * (int(completion_mask.sum()) / max(total_tokens, 1))
        (loss * world).backward()
        loss_sum += loss.item()
    # 4) AdamW step with grad-norm clipping; the norm of DTensor gradients is reduced across shards
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
    optimizer.step()
    # metrics: token means over the whole batch (sums and counts all-reduced), as train_small.train_step logs them
    keys = ("beta", "realised_kl", "replaced_frac", "teacher_logprob", "teacher_entropy")
    sums = [stats[k] * n if n else 0.0 for k in keys]
    if not cfg.chunked_loss:  # teacher view of the visited tokens from the loss pass, for every method
        sums[3:] = [logprob_sum, entropy_sum]
    loss, *sums = all_reduce_sum([loss_sum, *sums], device)
    means = {k: s / max(total_tokens, 1) for k, s in zip(keys, sums)}
    return {"step": step + 1, "loss": loss, "eps": kwargs["eps"], "temperature": kwargs["temperature"],
            "beta": means["beta"], "realised_kl": means["realised_kl"], "replaced_frac": means["replaced_frac"],
            "completion_tokens": int(total_tokens), "grad_norm": grad_norm.item(), "lr": small.lr_at(step, cfg),
            "teacher_logprob": means["teacher_logprob"], "teacher_entropy": means["teacher_entropy"],
            "tokens_per_s": total_tokens / (time.time() - started)}


def evaluate(student, tokenizer, held_out, cfg, seed, eos_ids, rank, world):
    """train_small.evaluate on this rank's share of the problems, then the problem-weighted mean over ranks. Inside
    gathered() the forwards are collective-free, so ranks may decode different numbers of steps here."""
    share = held_out.shard(num_shards=world, index=rank, contiguous=True)
    with gathered(student):
        scores = small.evaluate(student, tokenizer, share, cfg, seed=seed, eos_ids=eos_ids) if len(share) else {}
    totals = all_reduce_sum([scores.get("pass@1", 0.0) * len(share), scores.get("greedy", 0.0) * len(share)],
                            next(student.parameters()).device)
    return {"pass@1": totals[0] / len(held_out), "greedy": totals[1] / len(held_out)}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <out_dir>/checkpoints/step_XXXXXX, one DCP folder (each rank writes its shards of the student and of
# AdamW's state) + state.json (step; the data position follows it) + rng_rank<r>.pt. Written to .tmp-step_XXXXXX,
# renamed by rank 0 after a barrier, so an interrupted save is never picked up.


def save_checkpoint(out_dir, step, student, optimizer, generator, rank, world):
    """Every rank writes its shards and RNG states; rank 0 completes the folder and removes older checkpoints."""
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".tmp-step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(student, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "sampler_rng": generator.get_state()}, tmp / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("step_*"):
            if old != final:
                shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(path, student, optimizer, generator, rank, world):
    """Restores the sharded student and optimizer (DCP reshards them if the world size changed) and returns the
    step. RNG states are restored when the world size is the same; otherwise the sampler keeps its fresh seed."""
    model_state, optimizer_state = get_state_dict(student, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = json.loads((path / "state.json").read_text())
    if meta["world_size"] == world:
        rng = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch_rng"])
        random.setstate(rng["python_rng"])
        generator.set_state(rng["sampler_rng"])
    return meta["step"]


def export_student(student, tokenizer, path, dtype, rank):
    """Rank 0 writes the full student as a plain Hugging Face folder (safetensors), loadable by from_pretrained."""
    from transformers import AutoModelForCausalLM
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
    if rank == 0:
        plain = AutoModelForCausalLM.from_config(student.config)  # the unwrapped class, on CPU
        plain.load_state_dict(full)
        plain.to(dtype).save_pretrained(path)
        tokenizer.save_pretrained(path)
    dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Training run: train_small.train with the models sharded, the data split over ranks and rank-0 logging.


def train(cfg, rank, world, device):
    """One distillation run on all ranks; rank 0 writes metrics.jsonl, summary.json and the final student."""
    started = time.time()
    out = Path(cfg.out_dir)
    if cfg.batch_size % world:
        small.die(f"batch_size: {cfg.batch_size} prompts do not split evenly over {world} ranks")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    train_split, held_out = small.load_splits(cfg)
    for turn in (0, 1):  # rank 0 first: it trains and caches the synthetic models, the others then load them
        if (rank == 0) == (turn == 0):
            tokenizer, student, teacher, teacher_scores = small.load_models(cfg, train_split, held_out)
        dist.barrier()
    _, dtype = small.device_and_dtype(cfg)
    # Student: fp32 master weights, sharded; on GPU computed in bf16 with fp32 gradient reduction.
    mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    student = shard_model(student.float(), mp_policy)
    if cfg.teacher_sharding == "shard":  # frozen, no optimizer: sharded only to free memory while the student trains
        teacher = shard_model(teacher)
    eos_ids = small.stop_token_ids(tokenizer, student, teacher)
    generator = torch.Generator(device).manual_seed(cfg.seed + rank)  # each rank samples its own rollouts
    optimizer, start = small.make_optimizer(student, cfg), 0  # AdamW over the local shards (DTensors)
    checkpoint = small.latest_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, student, optimizer, generator, rank, world)
        if rank == 0:
            print(f"resumed from {checkpoint}")
    logged = out / "metrics.jsonl"
    history = [json.loads(line) for line in open(logged)] if rank == 0 and checkpoint and logged.exists() else []
    history = [row for row in history if row["step"] <= start]  # drop what the interrupted run logged after its save
    log = open(logged, "w") if rank == 0 else None
    if log:
        log.writelines(json.dumps(row) + "\n" for row in history)

    def record(row):
        history.append(row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()

    if start == 0:
        row = {"step": 0, "eps": trb.behavior(cfg.method, 0, cfg)["eps"], "beta": 0.0,
               **evaluate(student, tokenizer, held_out, cfg, cfg.seed, eos_ids, rank, world)}
        if rank == 0:
            print(f"step 0: pass@1 {row['pass@1']:.3f} greedy {row['greedy']:.3f}")
        record(row)
    bar = tqdm(range(start, cfg.max_steps), desc=f"distill {cfg.method} seed {cfg.seed} x{world}", initial=start,
               total=cfg.max_steps, disable=rank != 0)
    for step in bar:
        row = train_step(student, teacher, tokenizer, optimizer, small.train_questions(train_split, step, cfg), step,
                         cfg, generator, eos_ids, rank, world)
        if (cfg.eval_every and row["step"] % cfg.eval_every == 0) or row["step"] == cfg.max_steps:
            row.update(evaluate(student, tokenizer, held_out, cfg, cfg.seed + row["step"], eos_ids, rank, world))
            if rank == 0:
                tqdm.write(f"step {row['step']}: pass@1 {row['pass@1']:.3f} greedy {row['greedy']:.3f}")
        record(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", eps=f"{row['eps']:.3f}", beta=f"{row['beta']:.3f}")
        if cfg.checkpoint_every and row["step"] % cfg.checkpoint_every == 0:
            save_checkpoint(out, row["step"], student, optimizer, generator, rank, world)
    export_student(student, tokenizer, out / "student", dtype, rank)
    if rank == 0:
        log.close()
        evals = [row for row in history if "pass@1" in row]
        best = max(evals, key=lambda row: row["pass@1"])
        summary = {"method": cfg.method, "seed": cfg.seed, "steps": cfg.max_steps, "initial_pass@1": evals[0]["pass@1"],
                   "final_pass@1": evals[-1]["pass@1"], "final_greedy": evals[-1]["greedy"],
                   "best_pass@1": best["pass@1"], "best_step": best["step"], "teacher": teacher_scores,
                   "wall_s": round(time.time() - started, 1), "world_size": world,
                   "config": dataclasses.asdict(cfg)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return history


def main():
    cfg = small.load_config(sys.argv[1:])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.compare:
        small.die("compare: run one method per torchrun launch (train_fsdp.py trains a single run)")
    rank, world, device = init_distributed()
    train(cfg, rank, world, device)
    gc.collect()  # free FSDP's last gloo work objects while the interpreter is whole (else, rarely, SIGABRT at exit)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
