"""
Benchmarks for trb.py, each figure a ratio measured side by side in one process (medians of several runs).

    python -m scripts.bench            # every benchmark
    python -m scripts.bench solve      # solve_beta vs one log_softmax at Qwen3's vocabulary (B=8, V=151936, fp32)
    python -m scripts.bench memory     # chunked_opd_loss vs the dense path: peak extra memory, forward + backward
    python -m scripts.bench sampler    # blended_generate vs model.generate on small Qwen3-shaped models
    python -m scripts.bench decode --device=cuda --dtype=bfloat16   # tokens/s at Qwen3 shapes: eager/static/compiled
    python -m scripts.bench engine     # the vLLM engine vs blended_generate, tokens/s (in .venv-vllm; CPU: tiny shapes)
    python -m scripts.bench peer       # a train_small OPD step vs TRL's DistillationTrainer step (bench_peer.py)

CPU figures use 2 threads (`--threads`; peer: 1 per process). Absolute times mean something only on a GPU; ratios
travel.
"""
import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import trb
from distill import evaluation, fast, memory_plan, models, qwen3, vllm_engine
from distill.config import load_config
from scripts import bench_peer

ROOT = Path(__file__).resolve().parents[1]  # the child processes run `python -m scripts.bench` from here


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def solve_inputs(B=8, V=151936):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, V, generator=g) * 3  # (B, V) student logits
    teacher = student + torch.randn(B, V, generator=g) * 2  # (B, V) a correlated, different teacher
    return student, teacher


def _solve_child(runs, repeats):
    """Run in a fresh process, with no warm-up of any kind: solve_beta at eps = 0.02 in log_softmax units, per run, on
    buffers kept from call to call as a decode loop keeps them (fast.SolverBuffers)."""
    student, teacher = solve_inputs()
    buffers, ratios = fast.SolverBuffers(), []
    for _ in range(runs):
        t_ref = median_time(lambda: torch.log_softmax(student, -1), repeats, warmup=0)
        ratios.append(median_time(lambda: trb.solve_beta(student, teacher, 0.02, buffers=buffers), repeats,
                                  warmup=0) / t_ref)
    print(json.dumps(ratios))


def bench_solve(args):
    """solve_beta cost in units of one torch.log_softmax of the same (B, V) tensor: in a fresh process with no
    warm-up (the allocator's first state), then warm (a training loop's steady state)."""
    out = subprocess.run([sys.executable, "-m", "scripts.bench", "_solve_child", str(args.runs), str(args.repeats),
                          f"--threads={args.threads}"], cwd=ROOT, capture_output=True, text=True, check=True)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    student, teacher = solve_inputs()
    B, V = student.shape
    buffers = fast.SolverBuffers()  # kept from call to call, as fast.Decoding keeps them for the decode loop
    # Accuracy first, checked in float64. This also warms glibc's allocator (its mmap threshold adapts to the largest
    # freed block), so that each timing sees the steady state of a training loop rather than fresh page faults.
    rows = []
    for eps in (0.001, 0.02, 0.1):
        beta = trb.solve_beta(student, teacher, eps, buffers=buffers)
        log_mu = trb.blend_logprobs(student.double(), teacher.double(), beta.double())
        kl = (log_mu.exp() * (log_mu - torch.log_softmax(student.double(), -1))).sum(-1)
        rows.append(dict(eps=eps, mean_beta=beta.mean().item(), max_rel_kl_error=((kl - eps).abs() / eps).max().item()))
    for row in rows:
        ratios = []
        for _ in range(args.runs):  # alternate the two so that machine noise hits both alike
            t_ref = median_time(lambda: torch.log_softmax(student, -1), args.repeats)
            t_solve = median_time(lambda: trb.solve_beta(student, teacher, row["eps"], buffers=buffers), args.repeats)
            ratios.append(t_solve / t_ref)
        row.update(ratio=statistics.median(ratios), ratios=[round(x, 2) for x in ratios])
    t_ref = median_time(lambda: torch.log_softmax(student, -1), args.repeats)
    t_bisect = median_time(lambda: trb.solve_beta_bisect(student, teacher, 0.02, iters=40), 3, warmup=1)
    print(f"solve_beta, B={B}, V={V}, float32, {torch.get_num_threads()} threads "
          f"(median of {args.runs} runs x {args.repeats} repeats; unit = one log_softmax, {1e3 * t_ref:.2f} ms)")
    print(f"  fresh process, no warm-up, eps=0.02: solve_beta = {statistics.median(fresh):5.1f}x log_softmax  "
          f"runs {[round(x, 2) for x in fresh]}")
    print("  warm (after the float64 accuracy check: a training loop's steady state):")
    for row in rows:
        print(f"  eps={row['eps']:<6} solve_beta = {row['ratio']:5.1f}x log_softmax  runs {row['ratios']}  "
              f"mean beta {row['mean_beta']:.4f}  max |KL-eps|/eps {row['max_rel_kl_error']:.1e}")
    print(f"  for scale: trb.solve_beta_bisect (the paper's bisection), 40 steps, float32 = "
          f"{t_bisect / t_ref:.0f}x log_softmax")
    (eager_ops, eager_ms), (traced_ops, traced_ms) = token_rule_ops(True), token_rule_ops(False)
    print(f"blend_token_rule per token at B=16, V=151936, eps=0.02 (torch.profiler, top-level aten ops; on a GPU "
          f"each is a kernel launch):\n  eager, as decoded on a CPU or GPU: {eager_ops:5d} ops, {eager_ms:6.1f} ms CPU"
          f"\n  no host reads (a torch.compile trace): {traced_ops:5d} ops, {traced_ms:6.1f} ms CPU "
          f"({traced_ops / eager_ops:.0f}x the ops)")
    return rows


def token_rule_ops(reads, B=16, V=151936, eps=0.02):
    """(top-level aten ops, their CPU ms) of one blend_token_rule call at (B, V), profiled after a warm-up call.
    reads=True: the eager rule, as blended_generate runs it on a CPU or a GPU (it reads values to stop early);
    False: the rule with no host read, as inside a torch.compile trace (all iterations, both forms of the blend).
    On a GPU each op is at least one kernel launch."""
    from torch.profiler import ProfilerActivity, profile
    student, teacher = solve_inputs(B, V)
    u = torch.rand(1, B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    may_read = trb.may_read
    trb.may_read = may_read if reads else (lambda x: False)
    buffers = fast.SolverBuffers()  # as blended_generate passes them with fast.Decoding
    try:
        trb.blend_token_rule(student, teacher, eps, u, buffers)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trb.blend_token_rule(student, teacher, eps, u, buffers)
    finally:
        trb.may_read = may_read
    top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    return len(top), sum(e.cpu_time_total for e in top) / 1e3


def _peak_memory_child(mode, chunk_mib):
    """Run in a fresh process: peak extra RSS (MiB) of one forward + backward of the loss."""
    torch.manual_seed(0)
    N, H, V = 2048, 256, 151936  # B*T = 2048 positions
    hs = torch.randn(1, N, H, requires_grad=True)
    ws = (torch.randn(V, H) * 0.05).requires_grad_()
    ht, wt = torch.randn(1, N, H), torch.randn(V, H) * 0.05
    mask = torch.ones(1, N, dtype=torch.bool)
    ws.grad = torch.zeros_like(ws)  # gradient buffers exist in both paths, so they are not "extra"
    hs.grad = torch.zeros_like(hs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "dense":
        loss = trb.opd_loss(hs @ ws.T, ht @ wt.T, mask)
    else:
        loss = fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=chunk_mib)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(extra_mib=(after - before) / 1024, loss=loss.item())))


def bench_memory(args):
    """Peak extra memory (forward + backward) of chunked_opd_loss vs dense logits, each in a fresh process."""
    results = {}
    for mode, chunk in (("dense", 0), ("chunked", 593.5), ("chunked", 64), ("chunked", 16)):
        out = subprocess.run([sys.executable, "-m", "scripts.bench", "_memory_child", mode, str(chunk)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        results[(mode, chunk)] = json.loads(out.stdout.strip().splitlines()[-1])
    dense = results[("dense", 0)]
    print("chunked_opd_loss vs dense opd_loss, B*T=2048, V=151936, H=256, float32, forward + backward "
          "(peak extra RSS, fresh process each)")
    print(f"  dense logits                  {dense['extra_mib']:8.0f} MiB   loss {dense['loss']:.6f}")
    for (mode, chunk), row in results.items():
        if mode == "chunked":
            rows = fast.chunk_rows(chunk, 151936)
            print(f"  chunked, {chunk:5g} MiB ({rows:4d} rows)  {row['extra_mib']:8.0f} MiB   "
                  f"loss {row['loss']:.6f}   "
                  f"= {row['extra_mib'] / dense['extra_mib']:.3f} of dense")
    return results


def qwen3_shaped(layers, seed):
    """bench_sampler's models: 4,096 entries, 256 wide, weights drawn wider than the default (std 0.1) so that
    their next-token distributions are far from uniform."""
    return qwen3.random_qwen3(4096, 256, layers, seed, init_range=0.1).eval()


@torch.no_grad()
def reencode_generate(student, teacher, input_ids, attention_mask, eps, max_new_tokens, generator):
    """The same blended sampling without KV caches: both models re-encode the whole prefix at every step."""
    ids, mask = input_ids, attention_mask
    for _ in range(max_new_tokens):
        kwargs = dict(attention_mask=mask, position_ids=trb.position_ids(mask), use_cache=False, logits_to_keep=1)
        s = student(ids, **kwargs).logits[:, -1].float()
        t = teacher(ids, **kwargs).logits[:, -1].float()
        u = torch.rand(1, s.shape[0], dtype=torch.float64, generator=generator)  # (1, B) U[0, 1)
        token = trb.blend_token_rule(s, t, eps, u)["token"]
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def bench_sampler(args):
    """blended_generate vs model.generate sampling the same number of tokens, and KV caching vs re-encoding."""
    student, teacher = qwen3_shaped(4, seed=1), qwen3_shaped(6, seed=2)
    B, P, N = 16, 32, 96
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[::2, :5] = 0  # half the rows left-padded

    def hf_generate(model):
        return model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                              max_new_tokens=N, min_new_tokens=N, pad_token_id=0)

    def ours(eps, n=N, teacher_model=teacher):
        return trb.blended_generate(student, teacher_model, ids, mask, eps=eps, max_new_tokens=n,
                                    generator=torch.Generator().manual_seed(0))

    blend_ratio, student_ratio = [], []
    for _ in range(args.runs):  # interleaved, so machine noise hits all alike
        t_student = median_time(lambda: hf_generate(student), 1, warmup=1)
        t_teacher = median_time(lambda: hf_generate(teacher), 1, warmup=0)
        t_blend = median_time(lambda: ours(0.02), 1, warmup=1)
        t_alone = median_time(lambda: ours(0.0, teacher_model=None), 1, warmup=0)
        blend_ratio.append(t_blend / (t_student + t_teacher))
        student_ratio.append(t_alone / t_student)
    beta = evaluation.rollout_stats(ours(0.02))["beta"]
    print(f"blended_generate vs model.generate, Qwen3-shaped 4-layer student / 6-layer teacher, H=256, V=4096, "
          f"B={B}, P={P}, {N} new tokens, {torch.get_num_threads()} threads (median of {args.runs} interleaved runs)")
    print(f"  eps=0.02 (mean beta {beta:.3f}): blended / (student.generate + teacher.generate) = "
          f"{statistics.median(blend_ratio):.2f}x   runs {[round(x, 2) for x in blend_ratio]}")
    print(f"  eps=0, teacher=None:        blended / student.generate = "
          f"{statistics.median(student_ratio):.2f}x   runs {[round(x, 2) for x in student_ratio]}")
    n_long = 256
    cache_ratio = []
    for _ in range(max(1, args.runs // 2)):
        t_cached = median_time(lambda: ours(0.02, n=n_long), 1, warmup=0)
        t_reencode = median_time(lambda: reencode_generate(student, teacher, ids, mask, 0.02, n_long, g), 1, warmup=0)
        cache_ratio.append(t_reencode / t_cached)
    print(f"  KV caching vs re-encoding the prefix, {n_long} new tokens at eps=0.02: "
          f"{statistics.median(cache_ratio):.1f}x faster   runs {[round(x, 1) for x in cache_ratio]}")


def decode_model(name, device, dtype, seed):
    """A random-weight causal LM: Qwen3's published shapes for 0.6B/1.7B/4B/8B (memory_plan.QWEN3, no download), or
    the small CPU shapes of bench_sampler: tiny (4 layers) and small (6 layers)."""
    from transformers import Qwen3ForCausalLM
    if name in ("tiny", "small"):
        return models.to_compute_dtype(  # float32 rotary frequencies, as from_pretrained keeps them
            qwen3_shaped({"tiny": 4, "small": 6}[name], seed=seed).to(device), dtype)
    config = memory_plan.builtin_qwen3(f"Qwen/Qwen3-{name}")
    if config is None:
        raise SystemExit(f"error: --pairs: unknown model {name!r}; choose from tiny, small, "
                         + ", ".join(memory_plan.QWEN3))
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(config, torch_dtype=dtype).eval()


def bench_decode(args):
    """
    Rollout decoding: blended_generate at eps = 0.02 (both models in lockstep, solve and blend per token) against
    student.generate followed by teacher.generate, each decoding exactly N tokens per row from the same prompts, with
    the same settings: eager with a DynamicCache, a StaticCache, a StaticCache with a compiled step (ours: both
    forwards, the token rule eager; Hugging Face: the forward, with CUDA graphs on a GPU). Reports tokens/s (B * N over
    wall time, compile excluded by a warm-up call), the token rule's share of a blended decode step, and peak memory.
    """
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    P = args.prompt_tokens
    print(f"blended decode vs student.generate + teacher.generate, {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, {args.dtype}, "
          f"prompt {P} tokens, eps=0.02, temperature 1; tokens/s = rows x new tokens / s (medians of {args.runs})")
    print(f"  {'student <- teacher':20s} {'B':>4s} {'N':>5s} {'setting':16s} {'ours tok/s':>11s} "
          f"{'HF tok/s':>9s} {'ours/HF time':>12s} {'rule share':>10s} {'peak GiB':>9s}")
    for pair in args.pairs.split(","):
        s_name, t_name = pair.split(":")
        student, teacher = decode_model(s_name, device, dtype, 1), decode_model(t_name, device, dtype, 2)
        V = student.config.vocab_size
        for B in [int(b) for b in args.batch.split(",")]:
            for N in [int(n) for n in args.new_tokens.split(",")]:
                g = torch.Generator(device).manual_seed(0)
                ids = torch.randint(0, V, (B, P), generator=g, device=device)
                mask = torch.ones_like(ids)
                for setting in args.settings.split(","):
                    cache, compile = {"eager": ("dynamic", False), "static": ("static", False),
                                      "compiled": ("static", True)}[setting]
                    hf = dict(cache_implementation="static" if cache == "static" else None,
                              disable_compile=not compile)
                    decoding = fast.Decoding(cache=cache, compile=compile)  # one per setting: its compiled step is kept

                    def ours():
                        return trb.blended_generate(student, teacher, ids, mask, eps=0.02, max_new_tokens=N,
                                                    generator=torch.Generator(device).manual_seed(0),
                                                    decoding=decoding)

                    def theirs():
                        for model in (student, teacher):
                            model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                           temperature=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=0, **hf)

                    def timed(fn):
                        sync()
                        start = time.perf_counter()
                        fn()
                        sync()
                        return time.perf_counter() - start

                    ours(), theirs()  # warm-up: compiles, CUDA graph captures, allocator
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t_ours, t_theirs = [], []
                    for _ in range(args.runs):  # interleaved, so machine noise hits both alike
                        t_ours.append(timed(ours))
                        t_theirs.append(timed(theirs))
                    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else math.nan
                    logits = torch.randn(2, B, V, generator=g, device=device) * 3
                    u = torch.rand(1, B, dtype=torch.float64, device=device, generator=g)
                    eps, rule = 0.02, trb.blend_token_rule  # eager in every setting, as blended_generate runs it
                    rule(logits[0], logits[0] + logits[1], eps, u)  # warm-up
                    t_rule = statistics.median(timed(lambda: rule(logits[0], logits[0] + logits[1], eps, u))
                                               for _ in range(20))
                    t_o, t_t = statistics.median(t_ours), statistics.median(t_theirs)
                    print(f"  {s_name + ' <- ' + t_name:20s} {B:4d} {N:5d} {setting:16s} {B * N / t_o:11.0f} "
                          f"{B * N / t_t:9.0f} {t_o / t_t:12.2f} {N * t_rule / t_o:10.1%} {peak:9.1f}", flush=True)
        student = teacher = None  # free the pair before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_engine(args):
    """
    Rollout tokens/s of the vLLM engine (vllm_engine.Engine) against blended_generate with a static cache, on the same
    prompts and weights, one after the other: the HF loop first, in calls of --hf_rows rows of --hf_new_tokens tokens
    (by default all rows and N; on a GPU, 64 rows' static caches at 1.7B <- 8B do not fit beside the two models, so
    gpu_check decodes 16 rows per call, the preset's rollout_batch_size, whose rate is the loop's for any multiple of
    16 rows), then its caches are freed and both models moved to host memory, and the engine decodes all rows in one
    call in the fraction of the GPU --engine_fraction gives it (default: what train_fsdp.py gives it in the 1.7B <- 8B
    preset on 8 GPUs of this size, memory_plan). At eps = 0.02 (both models, the blend solved per token) and with the
    teacher's stack off (the student alone, as after TRB's warmup). No stop ids, so every row decodes its tokens.
    First, with --tokens_out, the engine's greedy tokens at eps 0.5 (engine_greedy). --eager: an engine without
    torch.compile or CUDA graphs, its greedy tokens only (gpu_check compares the two token for token). Needs the vLLM
    environment (.venv-vllm).
    """
    import tempfile
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    s_name, t_name = args.pairs.split(",")[0].split(":")
    if args.models:  # gpu_check's folders: the engine reads the teacher's weights where they are
        from transformers import AutoModelForCausalLM
        s_name, t_name = "student", "teacher"
        student, teacher = (AutoModelForCausalLM.from_pretrained(Path(args.models) / name, dtype=dtype).to(device)
                            for name in (s_name, t_name))
        teacher_dir = Path(args.models) / "teacher"
    else:
        student, teacher = decode_model(s_name, device, dtype, 1), decode_model(t_name, device, dtype, 2)
        teacher_dir = None
    V, P = student.config.vocab_size, args.prompt_tokens
    B, N = int(args.batch.split(",")[-1]), int(args.new_tokens.split(",")[-1])
    rows, hf_tokens = args.hf_rows or B, args.hf_new_tokens or N
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, V, (B, P), generator=g, device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        start = time.perf_counter()
        tokens = fn()
        sync()
        return tokens / (time.perf_counter() - start)

    def ours(eps, n):
        decoding = fast.Decoding(cache="static")
        rollout = trb.blended_generate(student, teacher if eps > 0 else None, ids[:rows], mask[:rows], eps=eps,
                                       max_new_tokens=n, generator=torch.Generator(device).manual_seed(0),
                                       decoding=decoding)
        return int(rollout.completion_mask.sum())

    labels = (("eps=0.02, both models", 0.02), ("teacher off, student alone", 0.0))
    hf = {}
    if not args.eager:
        for label, eps in labels:
            ours(eps, 8)  # warm-up: kernels and allocator
            hf[label] = statistics.median(timed(lambda: ours(eps, hf_tokens)) for _ in range(args.runs))
    student, teacher = student.cpu(), teacher.cpu()  # the GPU is the engine's
    if device.type == "cuda":
        torch.cuda.empty_cache()
        gpu_gib = round(torch.cuda.get_device_properties(device).total_memory / memory_plan.GiB, 1)
        preset = load_config([f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}", "--engine=vllm"])
        fraction = args.engine_fraction or memory_plan.plan(preset, 8, gpu_gib)["engine_fraction"]
        free_before = torch.cuda.mem_get_info()[0]
    else:
        fraction = args.engine_fraction or 0.5
    folder = Path(tempfile.mkdtemp(prefix="trb_bench_engine_"))
    if teacher_dir is None:
        teacher_dir = folder / "teacher_src"
        vllm_engine.save_model(teacher, teacher_dir)
    cfg = SimpleNamespace(teacher=str(teacher_dir), seed=0, max_prompt_tokens=max(P, GREEDY[1]),
                          max_new_tokens=max(N, GREEDY[2]), eval_max_new_tokens=N, vllm_cpu_kv_cache_gib=2,
                          vllm_gpu_memory_utilization=fraction)
    engine = vllm_engine.Engine(cfg, student, teacher, V, [], folder / "run", device=device, eager=args.eager)
    where = args.device + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    kind = "eager (no compile, no CUDA graphs)" if args.eager else "compiled, CUDA graphs"
    if device.type == "cuda":
        taken = (free_before - torch.cuda.mem_get_info()[0]) / memory_plan.GiB
        print(f"vLLM engine memory: {taken:.1f} GiB of the GPU taken by its start, {kind}; its fraction "
              f"{fraction} of {gpu_gib} GiB is {fraction * gpu_gib:.1f} GiB")
    if args.tokens_out:
        tokens = engine_greedy(engine, V)
        Path(args.tokens_out).write_text(json.dumps(tokens))
        print(f"greedy tokens at eps 0.5 ({kind}): {len(tokens)} rows, written to {args.tokens_out}")
    if not args.eager:
        print(f"vLLM engine vs blended_generate (static cache), {s_name} <- {t_name}, {where}, {args.dtype}, "
              f"prompt {P}, temperature 1; engine: {B} rows x {N} new tokens in one call; HF loop: {rows} rows x "
              f"{hf_tokens} new tokens per call; tokens/s, medians of {args.runs} runs")
        for label, eps in labels:
            if eps == 0:
                engine.drop_teacher()
            theirs = lambda n: int(engine.rollouts(ids.cpu(), mask.cpu(), eps=eps, temperature=1.0, max_new_tokens=n,
                                                   generator=torch.Generator().manual_seed(0)).completion_mask.sum())
            theirs(8)  # warm-up
            vl = statistics.median(timed(lambda: theirs(N)) for _ in range(args.runs))
            print(f"  {label:28s} engine {vl:9.0f} tok/s   HF loop {hf[label]:9.0f} tok/s   engine/HF "
                  f"{vl / hf[label]:5.2f}x", flush=True)
    engine.close()


GREEDY = (16, 64, 128)  # engine_greedy's rows, prompt tokens and new tokens


def engine_greedy(engine, V):
    """The engine's greedy completions at eps 0.5 of GREEDY's random prompts (seed 0): the tokens gpu_check compares
    between an engine with CUDA graphs and an eager one. A graph that handed the teacher's stack memory still holding
    the student's last hidden states would change them from the first token on."""
    rows, prompt_tokens, new_tokens = GREEDY
    prompts = torch.randint(0, V, (rows, prompt_tokens), generator=torch.Generator().manual_seed(0)).tolist()
    ids, _ = engine.generate(prompts, eps=0.5, temperature=0.0, max_new_tokens=new_tokens)
    return [completions[0] for completions in ids]


def main():
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=None, help="solve | memory | sampler | decode | engine | peer "
                        "(default: the first three on CPU, decode on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; peer: 1 per process)")
    parser.add_argument("--runs", type=int, default=5, help="outer runs; the median ratio is reported")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per run (median)")
    decode = parser.add_argument_group("decode (python -m scripts.bench decode --device=cuda --dtype=bfloat16)")
    decode.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    decode.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    decode.add_argument("--pairs", default=None, help="student:teacher shapes, comma-separated: tiny, small (CPU), "
                        "0.6B, 1.7B, 4B, 8B (random weights); default 1.7B:8B on CUDA, tiny:small on CPU")
    decode.add_argument("--batch", default=None, help="rows, comma-separated (default 16,64 on CUDA, 4 on CPU)")
    decode.add_argument("--new_tokens", default=None, help="tokens per row (default 1024,8192 on CUDA, 32 on CPU)")
    decode.add_argument("--prompt_tokens", type=int, default=128)
    decode.add_argument("--settings", default="eager,static,compiled", help="eager (DynamicCache), static "
                        "(StaticCache), compiled (StaticCache and torch.compile)")
    engine = parser.add_argument_group("engine (python -m scripts.bench engine, in .venv-vllm)")
    engine.add_argument("--hf_rows", type=int, default=0, help="rows per HF loop call (default: all of --batch)")
    engine.add_argument("--hf_new_tokens", type=int, default=0, help="HF loop tokens per row (default: --new_tokens)")
    engine.add_argument("--engine_fraction", type=float, default=0, help="the engine's fraction of the GPU (default: "
                        "train_fsdp.py's in the 1.7B <- 8B preset on 8 GPUs)")
    engine.add_argument("--eager", action="store_true", help="an engine without torch.compile or CUDA graphs; its "
                        "greedy tokens only")
    engine.add_argument("--models", default="", help="a folder with student/ and teacher/ model folders in place of "
                        "--pairs' random weights")
    engine.add_argument("--tokens_out", default="", help="write the engine's greedy tokens at eps 0.5 to this JSON "
                        "file")
    peer = parser.add_argument_group("peer (python -m scripts.bench peer; TRL from requirements-dev.txt)")
    peer.add_argument("--rounds", type=int, default=4, help="rounds of one fresh process per side, interleaved")
    peer.add_argument("--steps", type=int, default=6, help="timed steps per process (after one warm-up step)")
    peer.add_argument("--sides", default="opd,trl,trb", help=f"comma-separated, of {', '.join(bench_peer.SIDES)}")
    peer.add_argument("--peer_dir", default="runs/bench_peer", help="where the models and prompts are written (kept)")
    peer.add_argument("--check", type=int, default=1, help="1: also replay TRL's first rollout through train_small "
                      "and print both losses")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.which = args.which or (["decode"] if cuda else ["solve", "memory", "sampler"])
    args.threads = args.threads or (1 if args.which[:1] in (["peer"], ["_peer_child"]) else 2)
    args.pairs = args.pairs or ("1.7B:8B" if cuda else "tiny:small")
    args.batch = args.batch or ("16,64" if cuda else "4")
    args.new_tokens = args.new_tokens or ("1024,8192" if cuda else "32")
    if args.dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"error: --dtype: expected float32 or bfloat16, got {args.dtype!r}")
    torch.set_num_threads(args.threads)
    if args.which[:1] == ["_memory_child"]:
        return _peak_memory_child(args.which[1], float(args.which[2]))
    if args.which[:1] == ["_peer_child"]:
        return bench_peer.child(args.which[1], args.which[2], int(args.which[3]), int(args.which[4]))
    if args.which[:1] == ["_solve_child"]:
        return _solve_child(int(args.which[1]), int(args.which[2]))
    for name in args.which:
        {"solve": bench_solve, "memory": bench_memory, "sampler": bench_sampler, "decode": bench_decode,
         "engine": bench_engine, "peer": bench_peer.bench_peer}[name](args)
        print()


if __name__ == "__main__":
    main()
