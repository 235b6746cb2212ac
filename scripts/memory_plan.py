"""
Memory per GPU of a training run, computed from the model configs (distill/memory_plan.py: on the meta device, no
weights, no GPU), as a table by moment of the step; with --measure also a real train_small.train on CPU, measured
against the plan.

    python -m scripts.memory_plan --config=configs/qwen3_1.7b_from_8b.yaml --world_size=8   # train_fsdp.py, 8 GPUs
    python -m scripts.memory_plan --config=configs/gsm8k_1gpu.yaml                          # train_small.py, 1 GPU
    python -m scripts.memory_plan --measure --config=... [--key=value ...]                 # also measure on CPU

Options besides every config key: --world_size=N (default 1), --gpu_gib=N (default 80), --measure.
"""
import bisect
import gc
import sys
import warnings

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, record_function

import train_small
from distill import memory_plan, models
from distill.config import die, load_config, usage

GiB = memory_plan.GiB


def measure(cfg):
    """
    Peak bytes per moment of a real train_small.train(cfg) on CPU, measured: torch.profiler's memory events (every
    allocation and free of the CPU allocator, in time order) summed into the bytes allocated at each instant, whose
    maximum is read inside the ranges a run marks with the moments' names (moment). The live
    tensors are counted after each optimizer step; their difference to the running sum at that instant (tensors the
    profiler never saw allocated, such as weights from_pretrained converts to another dtype) is added to every
    moment. At rest is the sum when a later step's rollout begins.
    """
    if models.device_and_dtype(cfg)[0].type != "cpu":
        die("measure: CPU only (on a GPU, read torch.cuda.max_memory_allocated in each moment instead)")
    live = []

    def count_live(*_):
        gc.collect()
        storages = {}
        with warnings.catch_warnings(), record_function("census"):  # isinstance on some objects warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    try:
                        storage = obj.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
                    except RuntimeError:  # a fake tensor that an earlier torch.compile trace left: holds no memory
                        continue
        live.append(sum(storages.values()))

    handle = register_optimizer_step_post_hook(count_live)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_small.train(cfg)
    finally:
        handle.remove()
    events = prof.profiler.kineto_results.events()
    allocated, times, total = [], [], 0
    for time, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        total += nbytes
        times.append(time)
        allocated.append(total)
    at = lambda t: allocated[bisect.bisect_right(times, t) - 1] if times and times[0] <= t else 0
    censuses = sorted(e.start_ns() for e in events if e.name() == "census")
    if not censuses:
        die("measure: no optimizer step ran (max_steps: at least 1)")
    offset = live[-1] - at(censuses[-1])
    # at rest: when a later step's rollout begins (the census itself runs inside train_step, whose last micro-batch
    # is still referenced)
    rollouts = [e.start_ns() for e in events if e.name() == memory_plan.MOMENT + "rollout peak"]
    peaks = {"at rest": max([at(t) + offset for t in rollouts if t > censuses[0]] or live)}
    for e in events:
        name = e.name().removeprefix(memory_plan.MOMENT)
        if name != e.name():
            first, last = bisect.bisect_left(times, e.start_ns()), bisect.bisect_right(times, e.end_ns())
            peak = max([at(e.start_ns())] + allocated[first:last]) + offset
            peaks[name] = max(peaks.get(name, 0), peak)
    return {m: peaks[m] for m in memory_plan.MOMENTS if m in peaks}


def format_comparison(planned, measured):
    """The plan (without the CUDA allowance, which a CPU does not need) against a measured run, in MiB, per moment:
    totals, and what each moment adds to the state at rest."""
    MiB, context = 1024 ** 2, planned["moments"]["at rest"]["CUDA context, NCCL (allowance)"]
    plan_total = {m: planned["totals"][m] - context for m in measured}
    lines = [f"{'MiB':<16}{'measured':>10}{'plan':>10}{'plan/measured':>15}{'above rest: measured':>22}{'plan':>8}"
             f"{'plan/measured':>15}"]
    for m, value in measured.items():
        above = value - measured["at rest"], plan_total[m] - plan_total["at rest"]
        ratio = f"{above[1] / above[0]:>15.2f}" if above[0] > 0 else f"{'':>15}"
        lines.append(f"{m:<16}{value / MiB:>10.1f}{plan_total[m] / MiB:>10.1f}{plan_total[m] / value:>15.2f}"
                     f"{above[0] / MiB:>22.1f}{above[1] / MiB:>8.1f}{ratio}")
    return "\n".join(lines)


def main(argv):
    """[--world_size=N] [--gpu_gib=N] [--measure] and the usual --config/--key=value arguments."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"{__doc__.strip()}\n\nThe config keys:\n{usage().split(chr(10), 2)[2]}")
        sys.exit(0)
    options, rest = memory_plan.options([arg for arg in argv if arg != "--measure"], world_size=1, gpu_gib=80)
    cfg, world = load_config(rest), options["world_size"]
    if "--measure" in argv and world > 1:
        die("world_size: --measure runs train_small.py, world size 1")
    result = memory_plan.report(cfg, world, options["gpu_gib"])
    if "--measure" in argv:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        print(f"\nmeasured on CPU ({torch.get_num_threads()} threads), train_small.train for {cfg.max_steps} steps:")
        print(format_comparison(result, measure(cfg)))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
