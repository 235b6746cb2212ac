"""
Helper of tests/test_fsdp.py, run under `torchrun --nproc_per_node=2`. With FSDP2's collectives counted, it measures:
- the all-gathers of a rollout of 8 and of 32 new tokens (no EOS, so every token is decoded), with
  evaluation.HFDecoder under the FSDP hooks (parameters gathered once) and with plain trb.blended_generate on the same
  sharded models (FSDP's per-forward gathering);
- over 4 training steps of 2 micro-batches each, with a sharded teacher and the chunked loss: the reduce-scatters per
  step, the length of the teacher's forward record after each step, and FSDP's warnings.
Rank 0 prints one JSON line.
"""
import dataclasses
import gc
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_fsdp  # noqa: E402
import train_small  # noqa: E402
import trb  # noqa: E402
from distill import config, evaluation, math_data, synthetic_task  # noqa: E402

calls = {"all_gather": 0, "reduce_scatter": 0}


def counting(kind, function):
    def wrapper(*args, **kwargs):
        calls[kind] += 1
        return function(*args, **kwargs)
    return wrapper


def main():
    torch.set_num_threads(1)
    cfg = config.load_config(["--teacher_sharding=shard", "--dtype=float32", "--batch_size=4",
                              "--rollouts_per_prompt=1", "--micro_batch_size=1", "--max_new_tokens=6",
                              "--chunked_loss=true", "--method=trb", "--eps0=0.5"])
    runtime = train_fsdp.FSDP(cfg)
    rank, device = runtime.rank, runtime.device
    for kind, names in (("all_gather", ("all_gather_single", "all_gather_into_tensor")),
                        ("reduce_scatter", ("reduce_scatter_single", "reduce_scatter_tensor"))):  # FSDP2 calls dist.<name> at call time
        for name in names:
            if hasattr(dist, name):
                setattr(dist, name, counting(kind, getattr(dist, name)))
    tokenizer = synthetic_task.char_tokenizer()
    student, teacher = runtime.prepare(synthetic_task.tiny_qwen3(tokenizer, 2, 32, seed=0),
                                       synthetic_task.tiny_qwen3(tokenizer, 3, 32, seed=1).requires_grad_(False).eval())
    student.eval()
    input_ids, mask = math_data.encode_prompts(["12+34=", "5+6="], tokenizer, device)
    behavior = {"eps": 0.5, "temperature": 1.0}  # TRB blend: both models decode
    result = {"fsdp_units": len(train_fsdp.fsdp_modules(student)) + len(train_fsdp.fsdp_modules(teacher))}
    for name, gathered_once in (("gathered", True), ("per_forward", False)):
        for tokens in (8, 32):
            calls["all_gather"] = 0
            kwargs = dict(max_new_tokens=tokens, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                          generator=torch.Generator().manual_seed(rank), vocab_size=len(tokenizer))
            if gathered_once:
                decoder = evaluation.HFDecoder(dataclasses.replace(cfg, rollout_batch_size=0), student, teacher,
                                               runtime, [], tokenizer.pad_token_id, len(tokenizer))
                rollout = decoder.rollouts(input_ids, mask, kwargs["generator"], tokens, **behavior)
            else:
                rollout = trb.blended_generate(student, teacher, input_ids, mask, **behavior, **kwargs,
                                               all_finished=runtime.all_finished)
            assert rollout.sequences.shape[1] == input_ids.shape[1] + tokens
            result[f"{name}_{tokens}"] = calls["all_gather"]
    # Training steps: 2 rows per rank in micro-batches of 1; the teacher is sharded and never runs a backward.
    optimizer = train_small.make_optimizer(student, cfg)
    questions = ["12+34=", "5+6=", "7+8=", "90+1="][runtime.share(cfg.batch_size)]
    result["reduce_scatters"], result["teacher_record"] = [], []
    teacher_group = teacher._get_fsdp_state()._fsdp_param_groups[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            calls["reduce_scatter"] = 0
            run = train_small.Run(cfg, runtime, tokenizer, student, teacher, optimizer, [tokenizer.eos_token_id])
            run.decoder = train_small.make_decoder(run, step)
            train_small.train_step(run, questions, step)
            result["reduce_scatters"].append(calls["reduce_scatter"])
            result["teacher_record"].append(len(teacher_group.comm_ctx.post_forward_order))
    result["student_units"] = len(train_fsdp.fsdp_modules(student))
    result["view_warnings"] = sum("view tensor" in str(w.message) for w in caught)
    if rank == 0:
        print(json.dumps(result))
    gc.collect()  # free FSDP's gloo work objects while the interpreter is whole (else, now and then, SIGABRT at exit)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
