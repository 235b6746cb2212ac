"""
On-policy distillation with TRB (arXiv 2605.31159) at full size: train_small.py under torchrun with PyTorch FSDP2.

The training step, loop, losses, data, evaluation and config are train_small.py's and trb.py's. train_small.py calls
a `SingleDevice` object wherever several processes would have to cooperate; this file's `FSDP` subclass is its
distributed version, and that is all the distributed training there is. Read the two side by side. The recipe:

  [ ] Process group: NCCL with one GPU per rank (gloo on CPU), every collective bounded by dist_timeout_minutes.
  [ ] fully_shard each decoder layer, then the root (embeddings, final norm, head), as torchtitan does; HSDP on a 2-D
      mesh with hsdp_shard_size. The student's fp32 master weights are computed in bf16 (MixedPrecisionPolicy) with
      fp32 gradient reduction; the frozen teacher is replicated or sharded (teacher_sharding).
  [ ] Each rank takes a contiguous 1/world of every step's prompts and of the held-out problems (`share`).
  [ ] Rollouts gather the parameters once for the whole decode (`gathered`), not once per layer per token, and every
      rank decodes the same number of steps (`all_finished`: the one trap of lockstep decoding).
  [ ] Gradients accumulate unsharded over micro-batches and are reduce-scattered once, on the last (`sync_gradients`).
  [ ] Token counts and metrics are summed over ranks in float64 (`sum`).
  [ ] Checkpoints are sharded DCP folders, renamed into place by rank 0 after a barrier; the export is one plain
      Hugging Face folder with every stop id.
  [ ] Rank 0 alone logs, prints and writes out_dir.

Three places in train_small.py exist for this file: the loss is scaled by the world size before backward (FSDP's
reduce-scatter averages over ranks, so the step's token mean needs the sum), the gradient norm of DTensor gradients
is read with full_tensor(), and evaluation pads a rank's last call with uncounted problems so that every rank makes
the same calls. `forget_forwards` is a workaround on FSDP2's private state (checked against torch 2.13 and 2.14).

Launch (same config.yaml and --key=value overrides as train_small.py; NCCL on GPUs, gloo on CPU):
    torchrun --standalone --nproc_per_node=2 train_fsdp.py --max_steps=20         # CPU smoke run (synthetic task)
    torchrun --standalone --nproc_per_node=8 train_fsdp.py --config=configs/qwen3_1.7b_from_8b.yaml  # the paper's run
    python train_fsdp.py --plan --config=configs/qwen3_1.7b_from_8b.yaml --world_size=8  # memory per GPU, no GPU
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 --rdzv-id=trb \
        train_fsdp.py --config=... --hsdp_shard_size=8                             # multi-node: same on every node

The config keys only this script reads: teacher_sharding (replicate | shard), hsdp_shard_size (HSDP) and
dist_timeout_minutes. rollout_batch_size, micro_batch_size and eval_batch_size count rows per rank here.
"""
import gc
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

if int(os.environ.get("RANK", "0")) > 0:
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars on rank 0 only (read when tqdm is imported)

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import train_small as small
from distill import checkpoints, memory_plan, models
from distill.config import die, load_config


def init_distributed(timeout_minutes):
    """
    (rank, world_size, device) from torchrun's environment: NCCL with one GPU per process, else gloo on CPU. Every
    collective times out after `timeout_minutes` (dist_timeout_minutes) instead of NCCL's 10-minute default; the
    longest waits are kept far shorter (rollouts and evaluation decode in lockstep, real checkpoints load on every
    rank at once), so the timeout only ends a run whose ranks truly diverged.
    """
    timeout = timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def device_mesh(device, world, shard_size):
    """1-D mesh over all ranks (FSDP), or with hsdp_shard_size n a 2-D (world/n, n) mesh: parameters sharded within
    each group of n ranks (a node, over its fast links) and replicated across groups (HSDP: gradients reduce-scattered
    within a group, then all-reduced across groups)."""
    if not shard_size:
        return init_device_mesh(device.type, (world,))
    if world % shard_size:
        die(f"hsdp_shard_size: {shard_size} does not divide the {world} ranks")
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def shard_model(model, mesh, mp_policy=None):
    """FSDP2 as torchtitan does it: each decoder layer is one unit (one all-gather), then the root (embeddings,
    final norm, head; tied weights stay together there)."""
    kwargs = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {})}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)] if isinstance(model, FSDPModule) else []


def forget_forwards(model):
    """
    A workaround on FSDP2's private state (`_get_fsdp_state()._fsdp_param_groups`), checked against torch 2.13 (the
    trainer's environment) and 2.14 (vLLM's CUDA environment): in both, FSDPParamGroup.post_forward appends the group
    to `comm_ctx.post_forward_order` and its index to `_post_forward_indices`, and only the root's post-backward
    callback and finalize_backward clear them. A new torch may rename these; tests/test_fsdp.py's bounded-record test
    then fails. FSDP2 records every forward of each unit (its post-forward order, used to prefetch in backward) and
    clears the record only at the end of a backward. A frozen sharded teacher never runs one, so without this its
    record would grow by one entry per unit at every forward, every step (a slow leak and ever longer lists).
    """
    for m in fsdp_modules(model):
        for group in m._get_fsdp_state()._fsdp_param_groups:
            group.comm_ctx.post_forward_order.clear()
            group._post_forward_indices.clear()


class FSDP(small.SingleDevice):
    """train_small.SingleDevice's hooks for FSDP2 under torchrun: the whole distributed part of training."""
    decodes_compute_dtype = True  # the gathered mixed-precision parameters are in the compute dtype already

    def __init__(self, cfg):
        self.dtype = models.device_and_dtype(cfg)[1]
        self.decoder = None  # the run's decoder, closed with the process group (close_decoder)
        self.signalled = False  # whether any rank has received a stop signal, as of the last sum (interrupted)
        self.rank, self.world, self.device = init_distributed(cfg.dist_timeout_minutes)
        self.mesh = device_mesh(self.device, self.world, cfg.hsdp_shard_size)
        self.teacher_sharding = cfg.teacher_sharding

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it trains and caches the synthetic models), the other ranks after it."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def prepare(self, student, teacher):
        """Student: fp32 master weights, sharded; on GPU computed in bf16 with fp32 gradient reduction. Teacher:
        frozen, no optimizer state; sharded only to free memory while the student trains (teacher_sharding)."""
        mp_policy = (MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
                     if self.dtype != torch.float32 else None)
        student = shard_model(student.float(), self.mesh, mp_policy)
        if self.teacher_sharding == "shard":
            teacher = shard_model(teacher, self.mesh)
        return student, teacher

    @contextmanager
    def gathered(self, *models):
        """
        Parameters all-gathered once on entry (one all-gather per FSDP unit) and kept while the block decodes, instead
        of an all-gather per layer per forward, i.e. per generated token; freed on exit, before the update. Inside,
        forward calls issue no collectives. Replicated (non-FSDP) models and None pass through.
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
                    m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's default: root stays gathered
                if model is not None and not any(p.requires_grad for p in model.parameters()):
                    forget_forwards(model)

    def sync_gradients(self, student, last):
        """Gradients accumulate unsharded (in float32) over micro-batches and are reduce-scattered once, on the last."""
        student.set_requires_gradient_sync(last)

    def all_finished(self, done):
        """
        blended_generate's stop rule under FSDP, and the one trap of lockstep decoding: a rank whose rows have all hit
        EOS must keep decoding (padding) until every rank's rows have, because each forward call of an FSDP module may
        all-gather, and a rank that stops early leaves the others waiting in that collective forever. MIN over ranks
        of "all my rows are done"; one 1-element all-reduce, asked every stop_check_every tokens.
        """
        flag = done.all().to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def sum(self, values):
        """Sum over ranks, in float64 so that token counts stay exact. Each sum also carries whether this rank has
        received a stop signal (SIGTERM, SIGINT), so that the ranks agree on it without a collective of its own."""
        signalled = float(self.interruption is not None and self.interruption.signal is not None)
        total = torch.tensor([*values, signalled], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        *total, signalled = total.tolist()
        self.signalled |= signalled > 0
        return total

    def interrupted(self):
        """The signal to stop after this step, or None: every rank reads the same flag, the one that the last sum all
        of them made carried, and all save the same step and stop; the signal's number (for the exit code) is the
        largest any rank received (one more all-reduce, made only once the ranks agreed to stop)."""
        if not self.signalled:
            return None
        signum = torch.tensor([self.interruption.signal or 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum.item())

    def everywhere(self, flag):
        """Whether flag holds on every rank: a MIN all-reduce, so that all ranks stop or move on together."""
        flag = torch.tensor([int(bool(flag))], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def stop(self, message):
        """Every rank closes the process group as main() does at the end (exiting with it open can abort in gloo's
        teardown), then exits with code 2; rank 0 says why in one line."""
        close(self)
        super().stop(message)

    def close_decoder(self, decoder):
        """Kept until close(): under torchrun the vLLM engine's teardown closes the process group, which the export
        still needs."""
        self.decoder = decoder

    def share(self, n):
        """This rank's contiguous rows of a global batch of n."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def head_weight(self, model, V):
        """A sharded frozen model's gathered head is freed when gathered() exits, but chunked_opd_loss reads it again
        in its backward: keep a copy. (The student's root stays gathered from its forward until its backward.)"""
        weight = super().head_weight(model, V)
        return weight.detach().clone() if isinstance(model, FSDPModule) and not weight.requires_grad else weight

    # Checkpoints: <out_dir>/checkpoints/step_XXXXXX, one DCP folder (each rank writes its shards of the student and
    # of AdamW's state) + state.json (step; the data position follows it) + rng_rank<r>.pt. Written to
    # .tmp-step_XXXXXX and renamed by rank 0 after a barrier, so an interrupted save is never picked up.

    def save_checkpoint(self, out_dir, step, student, optimizer, keep):
        """Every rank writes its shards and RNG states; rank 0 completes the folder and removes all but the newest
        `keep` checkpoints."""
        final = checkpoints.checkpoint_path(out_dir, step)
        tmp = final.with_name(f".tmp-{final.name}")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(student, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   tmp / f"rng_rank{self.rank}.pt")
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
            (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": self.world}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            checkpoints.remove_older_checkpoints(out_dir, step, keep)
        dist.barrier()

    def load_checkpoint(self, path, student, optimizer, cfg):
        """
        Restores the sharded student and optimizer (DCP reshards them if the world size changed) and returns the
        step. The global RNG states are restored when the world size is the same (the rollout sampler needs none:
        each step's is seeded by seed, step and rank).
        A checkpoint that cannot be loaded raises on every rank at the same point, so that all ranks fall back to the
        one before together (checkpoints.resume_from): the small files are read first and the ranks agree on them
        before DCP's collectives start, and DCP itself gathers each rank's read errors and raises on all of them.
        Whatever a failed load wrote into the student's and AdamW's tensors, the next load overwrites: DCP loads
        every key of the state dict.
        """
        try:
            meta = json.loads((Path(path) / "state.json").read_text())
            rng = (torch.load(Path(path) / f"rng_rank{self.rank}.pt", weights_only=True)
                   if meta["world_size"] == self.world else None)
            problem = None
        except Exception as error:
            problem = error
        if not self.everywhere(problem is None):
            raise problem or RuntimeError("its state.json or RNG file cannot be read on another rank")
        model_state, optimizer_state = get_state_dict(student, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(state, checkpoint_id=path)
        except dcp.CheckpointException as error:  # a BaseException that holds each failed rank's exception
            raise next(iter(error.failures.values()))[0] from None  # the first, as an ordinary exception
        set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if rng is not None:
            torch.set_rng_state(rng["torch_rng"])
            random.setstate(rng["python_rng"])
        return meta["step"]

    def export(self, student, tokenizer, path, eos_ids):
        """Rank 0 writes the full student as a plain Hugging Face folder (safetensors), loadable by from_pretrained,
        with every stop id in its generation_config."""
        from transformers import AutoModelForCausalLM
        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            plain = AutoModelForCausalLM.from_config(student.config)  # the unwrapped class, on CPU
            plain.load_state_dict(full)
            plain.generation_config = student.generation_config
            plain = models.with_stop_ids(plain, eos_ids, tokenizer.pad_token_id).to(self.dtype)
            checkpoints.save_atomically(path, lambda tmp: (plain.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        dist.barrier()


def main():
    if "--plan" in sys.argv[1:]:
        return print_plan([arg for arg in sys.argv[1:] if arg != "--plan"])
    cfg = load_config(sys.argv[1:])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.compare:
        die("compare: run one method per torchrun launch (train_fsdp.py trains a single run)")
    runtime = FSDP(cfg)
    try:
        small.train(cfg, runtime)
    except checkpoints.Interrupted as stop:
        close(runtime)
        launch = launch_command(runtime.world)
        if runtime.is_main:
            small.stopped(stop, launch, sys.argv[1:])
        sys.exit(128 + stop.signum)
    close(runtime)
    if runtime.is_main:
        small.print_summary(cfg, sys.argv[1:], fsdp=True)


def print_plan(argv):
    """--plan: this launch's memory per GPU (memory_plan.report), the vLLM engine's fraction with it, printed without
    training: no process group, no weights, no GPU needed (under torchrun rank 0 prints). --world_size defaults to
    torchrun's WORLD_SIZE, else 8; --gpu_gib to this machine's GPU, else 80."""
    gpu_gib = round(torch.cuda.get_device_properties(0).total_memory / 1024 ** 3, 1) if torch.cuda.is_available() \
        else 80
    options, rest = memory_plan.options(argv, world_size=int(os.environ.get("WORLD_SIZE", 8)), gpu_gib=gpu_gib)
    cfg = load_config(rest)
    if int(os.environ.get("RANK", "0")) == 0:
        memory_plan.report(cfg, options["world_size"], options["gpu_gib"])


def launch_command(world):
    """The torchrun command that relaunches this run: one node's, or a placeholder for the rendezvous options of a
    multi-node launch (this process cannot see them)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local == world:
        return f"torchrun --standalone --nproc_per_node={world} train_fsdp.py"
    return f"torchrun --nnodes={world // local} --nproc_per_node={local} <your rendezvous options> train_fsdp.py"


def close(runtime):
    """Every rank closes the process group (exiting with it open can abort in gloo's teardown), after the vLLM engine,
    whose teardown closes it too."""
    gc.collect()  # free FSDP's last gloo work objects while the interpreter is whole (else, rarely, SIGABRT at exit)
    dist.barrier()
    if runtime.decoder is not None:
        runtime.decoder.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
