"""
Helper of tests/test_fsdp.py, run under `torchrun --nproc_per_node=2`: counts FSDP's all-gathers during a rollout of
8 and of 32 new tokens (no EOS, so every token is decoded), with train_small.rollouts under the FSDP hooks (parameters
gathered once) and with plain trb.blended_generate on the same sharded models (FSDP's per-forward gathering). Rank 0
prints one JSON line.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import synthetic_task  # noqa: E402
import train_fsdp  # noqa: E402
import train_small  # noqa: E402
import trb  # noqa: E402

calls = {"all_gather": 0}


def counting(function):
    def wrapper(*args, **kwargs):
        calls["all_gather"] += 1
        return function(*args, **kwargs)
    return wrapper


def main():
    torch.set_num_threads(1)
    runtime = train_fsdp.FSDP(SimpleNamespace(teacher_sharding="shard", dtype="float32"))
    rank, device = runtime.rank, runtime.device
    for name in ("all_gather_single", "all_gather_into_tensor"):  # FSDP2 calls dist.<name> at call time
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))
    tokenizer = synthetic_task.char_tokenizer()
    student, teacher = runtime.prepare(synthetic_task.tiny_qwen3(tokenizer, 2, 32, seed=0),
                                       synthetic_task.tiny_qwen3(tokenizer, 3, 32, seed=1).requires_grad_(False).eval())
    student.eval()
    input_ids, mask = train_small.encode_prompts(["12+34=", "5+6="], tokenizer, device)
    behavior = {"eps": 0.5, "temperature": 1.0}  # TRB blend: both models decode
    result = {"fsdp_units": len(train_fsdp.fsdp_modules(student)) + len(train_fsdp.fsdp_modules(teacher))}
    for name, gathered_once in (("gathered", True), ("per_forward", False)):
        for tokens in (8, 32):
            calls["all_gather"] = 0
            kwargs = dict(max_new_tokens=tokens, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                          generator=torch.Generator().manual_seed(rank), vocab_size=len(tokenizer))
            if gathered_once:
                rollout = train_small.rollouts(student, teacher, input_ids, mask, 0, runtime, **behavior, **kwargs)
            else:
                rollout = trb.blended_generate(student, teacher, input_ids, mask, **behavior, **kwargs,
                                               all_finished=runtime.all_finished)
            assert rollout.sequences.shape[1] == input_ids.shape[1] + tokens
            result[f"{name}_{tokens}"] = calls["all_gather"]
    if rank == 0:
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
