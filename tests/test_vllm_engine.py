"""The vLLM engine (vllm_engine.py) against the Hugging Face loop it stands in for: the same greedy tokens, the same
behavior log-probs, samples that follow mu*, weight syncs that reach it, and the same training run. Runs in the vLLM
environment (.venv-vllm, which ./run.sh test uses for this file); skipped where vLLM is not installed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM environment (.venv-vllm from requirements-vllm.txt) runs these tests")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import test_evaluate  # noqa: E402
from test_evaluate import benchmark_data, models_dir  # noqa: E402,F401 - fixtures: evaluate.py's models and data
import trb  # noqa: E402
from distill import vllm_engine  # noqa: E402

V, EOS, PAD = 90, [1, 2], 3  # tokenizer range (the heads have 96 rows), two stop ids, padding id


def qwen3(hidden, layers, seed):
    """A random Qwen3 (32-dim heads, 96 head rows) whose logits are spread enough for varied greedy paths, with the
    two EOS rows raised so that rows stop, at either id."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32,
                         max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
        head = model.lm_head.weight
        head[EOS] = head[EOS] * 2.5  # EOS rows of large norm: some rows stop early
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(student, teacher, other student, engine): one engine for the module (each one costs seconds to start)."""
    root = tmp_path_factory.mktemp("engine")
    student, teacher, other = qwen3(64, 2, 0), qwen3(128, 3, 1), qwen3(64, 2, 2)
    teacher.save_pretrained(root / "teacher_src")
    cfg = SimpleNamespace(teacher=str(root / "teacher_src"), seed=0, max_prompt_tokens=200, max_new_tokens=24,
                          eval_max_new_tokens=24, vllm_cpu_kv_cache_gib=1, vllm_gpu_memory_utilization=0.3)
    engine = vllm_engine.Engine(cfg, student, teacher, V, EOS, root / "run")
    return student, teacher, other, engine


def prompts(lengths, seed=0):
    """Left-padded (B, P) prompts of the given lengths, ids from 4 up (no pad or stop id inside a prompt)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(4, V, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def hf_rollout(student, teacher, ids, mask, eps, temperature=0.0, max_new_tokens=24):
    return trb.blended_generate(student, teacher, ids, mask, eps=eps, max_new_tokens=max_new_tokens,
                                temperature=temperature, eos_token_id=EOS, pad_token_id=PAD, vocab_size=V)


def completions(rollout, P):
    """Per row, the generated ids up to and including its EOS."""
    return [rollout.sequences[i, P:][rollout.completion_mask[i]].tolist() for i in range(rollout.sequences.shape[0])]


@torch.no_grad()
def teacher_forced_log_mu(student, teacher, sequence, P, eps, tau):
    """log mu*(token) at every generated position of one unpadded sequence, from full forwards of both models (no
    cache, no sampler): the independent recomputation the engine's log-probs are checked against."""
    x = torch.tensor(sequence)[None]
    s, t = (trb.canonicalise_eos(m(input_ids=x).logits[0, P - 1:-1, :V].float() / tau, EOS) for m in (student, teacher))
    beta = trb.solve_beta(s, t, eps) if eps > 0 else torch.zeros(s.shape[0])
    log_mu = trb.blend_logprobs(s, t, beta)
    return log_mu.gather(-1, x[0, P:, None])[:, 0]


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.5, math.inf])
def test_greedy_rollouts_equal_the_hf_loop(pair, eps):
    """Greedy rollouts through the engine equal blended_generate's token for token on left-padded prompts (rows of
    four lengths), including where rows stop at an EOS id, and its log-probs equal log mu*(token) within 1e-5."""
    student, teacher, _, engine = pair
    ids, mask = prompts([4, 9, 2, 6, 12, 5])
    reference = hf_rollout(student, teacher, ids, mask, eps)
    rollout = engine.rollouts(ids, mask, eps=eps, temperature=0.0, max_new_tokens=24)
    P = ids.shape[1]
    assert completions(rollout, P) == completions(reference, P)
    assert any(c and c[-1] == EOS[0] for c in completions(reference, P))  # some rows stopped at the merged EOS
    got, want = rollout.behavior_logprobs[rollout.completion_mask], reference.behavior_logprobs[reference.completion_mask]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rows_stop_at_either_eos_id(pair):
    """The stop ids are one event: over the greedy rollouts at eps 0.05, some row stops where the raw logits favour the
    second EOS id and some where they favour the first, and the engine ends both with EOS[0] as the HF loop does."""
    student, teacher, _, engine = pair
    ids, mask = prompts([3, 5, 7, 9, 11, 4, 6, 8], seed=1)
    rollout = engine.rollouts(ids, mask, eps=0.05, temperature=0.0, max_new_tokens=24)
    P, favoured = ids.shape[1], set()
    for i, c in enumerate(completions(rollout, P)):
        if c and c[-1] == EOS[0]:
            sequence = ids[i][mask[i].bool()].tolist() + c
            with torch.no_grad():
                last = student(input_ids=torch.tensor(sequence[:-1])[None]).logits[0, -1]
            favoured.add(EOS[int(last[EOS[1]] > last[EOS[0]])])
    assert favoured == set(EOS)


@pytest.mark.parametrize("eps, tau", [(0.05, 1.0), (0.5, 0.7)])
def test_sampled_logprobs_equal_a_teacher_forced_recomputation(pair, eps, tau):
    """For sampled rollouts, the engine's log-probs equal log mu*(token) recomputed by full forwards of both HF models
    at every generated position, within 2e-5."""
    student, teacher, _, engine = pair
    ids, mask = prompts([5, 8, 3])
    rollout = engine.rollouts(ids, mask, eps=eps, temperature=tau, max_new_tokens=16,
                              generator=torch.Generator().manual_seed(0))
    P = ids.shape[1]
    for i, c in enumerate(completions(rollout, P)):
        prompt = ids[i][mask[i].bool()].tolist()
        want = teacher_forced_log_mu(student, teacher, prompt + c, len(prompt), eps, tau)
        torch.testing.assert_close(rollout.behavior_logprobs[i, :len(c)], want, atol=2e-5, rtol=0)


def test_sampled_first_tokens_follow_mu(pair):
    """4000 first tokens sampled by the engine at eps 0.05 follow mu*: their total-variation distance to the exact
    mu* is within the 99.9th percentile of that distance for 4000 exact draws from mu* (500 simulations)."""
    student, teacher, _, engine = pair
    ids, mask = prompts([6])
    prompt = ids[0].tolist()
    n = 4000
    [samples], _ = engine.generate([prompt], eps=0.05, temperature=1.0, max_new_tokens=1, n=n, seed=3)
    counts = torch.bincount(torch.tensor([s[0] for s in samples]), minlength=V).double()
    with torch.no_grad():
        s, t = (trb.canonicalise_eos(m(input_ids=ids).logits[:, -1, :V].float(), EOS) for m in (student, teacher))
        mu = trb.blend_logprobs(s, t, trb.solve_beta(s, t, 0.05))[0].double().exp()
    tv = 0.5 * (counts / n - mu).abs().sum()
    draws = torch.multinomial(mu.expand(500, -1), n, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = torch.stack([torch.bincount(d, minlength=V) for d in draws]).double() / n
    threshold = torch.quantile(0.5 * (exact - mu).abs().sum(-1), 0.999)
    assert tv <= threshold, (float(tv), float(threshold))


def test_weight_sync_reaches_the_engine_only_with_the_prefix_cache_reset(pair):
    """After a sync to another student's weights the engine decodes that student (equal to the HF loop on it); with
    the prefix-cache reset left out, prompts the engine has seen reuse the old student's keys and values and the
    tokens differ. The first student is synced back afterwards."""
    student, teacher, other, engine = pair
    ids, mask = prompts([150, 140, 135], seed=5)  # longer than a cache block (128 on a CPU): the prefix cache keeps them
    P = ids.shape[1]
    before = completions(engine.rollouts(ids, mask, eps=0.0, temperature=0.0, max_new_tokens=24), P)
    assert before == completions(hf_rollout(student, None, ids, mask, 0.0), P)
    want = completions(hf_rollout(other, None, ids, mask, 0.0), P)
    assert want != before
    try:
        weights = [(name, t.detach().float()) for name, t in other.state_dict().items()]
        engine.llm.collective_rpc("trb_load_student", args=(weights,))  # a sync without the reset
        stale = completions(engine.rollouts(ids, mask, eps=0.0, temperature=0.0, max_new_tokens=24), P)
        engine.sync(other)
        synced = completions(engine.rollouts(ids, mask, eps=0.0, temperature=0.0, max_new_tokens=24), P)
    finally:
        engine.sync(student)
    assert synced == want
    assert stale != want


TINY = ["--task_digits=2", "--train_size=300", "--eval_size=6", "--eval_samples=2", "--eval_batch_size=16",
        "--teacher_layers=1", "--teacher_hidden=64", "--teacher_sft_steps=30", "--student_layers=1",
        "--student_hidden=32", "--student_sft_steps=10", "--student_sft_examples=64", "--sft_batch_size=8",
        "--batch_size=2", "--rollouts_per_prompt=2", "--max_new_tokens=12", "--max_steps=4", "--eval_every=2",
        "--warmup_steps=3", "--eps0=0.05", "--checkpoint_every=0", "--lr_warmup_steps=1", "--eval_max_new_tokens=12",
        "--temperature=0"]


def train(tmp_path, engine, *extra, name=None):
    """metrics.jsonl rows of a tiny greedy-rollout TRB run of train_small.py with the given engine (in tmp_path/name,
    the engine's name by default)."""
    out = tmp_path / (name or engine)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "train_small.py"), *TINY, f"--engine={engine}",
                             f"--cache_dir={tmp_path / 'cache'}", f"--out_dir={out}", *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(hf, engine):
    """Per step: loss and rollout diagnostics within 1e-4 (where the HF run logged them), the same greedy accuracy and
    completion tokens."""
    for a, b in zip(hf, engine):
        for name in ("loss", "beta", "realised_kl", "teacher_logprob", "teacher_entropy"):
            if name in a and not (isinstance(a[name], float) and math.isnan(a[name])):
                assert b[name] == pytest.approx(a[name], abs=1e-4), (a["step"], name)
        assert b.get("greedy") == a.get("greedy") and b.get("completion_tokens") == a.get("completion_tokens")


@pytest.mark.parametrize("chunked", ["false", "true"])
def test_training_with_the_engine_matches_the_hf_loop(tmp_path, chunked):
    """train_small.py --engine=vllm with greedy rollouts and an eps > 0 warmup (the teacher dropped from the engine
    once the budget is 0) gives --engine=hf's per-step losses within 1e-4, the same greedy accuracy and pass@1 inputs,
    and the same rollout diagnostics (beta, realised KL, teacher log-prob and entropy) within 1e-4, from the
    trainer's own forward with either loss."""
    hf = train(tmp_path, "hf", f"--chunked_loss={chunked}")
    engine = train(tmp_path, "vllm", f"--chunked_loss={chunked}")
    assert [r["step"] for r in engine] == [r["step"] for r in hf]
    assert any(0 < r.get("beta", 0) < 1 for r in hf)  # the blend was active at some step, not saturated
    assert_same_run(hf, engine)


def test_a_resumed_engine_run_equals_an_uninterrupted_one(tmp_path):
    """With sampled rollouts (temperature 1; the request seeds come from the step's generator), a --engine=vllm
    run stopped after its step-2 checkpoint and relaunched with --resume=true logs the uninterrupted run's steps:
    losses and diagnostics within 1e-4, the same completion tokens and greedy accuracy. The resumed engine decodes
    the checkpointed student, not the initial one."""
    sampled = ["--temperature=1", "--checkpoint_every=2"]
    whole = train(tmp_path, "vllm", *sampled, "--max_steps=4", name="whole")
    train(tmp_path, "vllm", *sampled, "--max_steps=2", name="parts")
    resumed = train(tmp_path, "vllm", *sampled, "--max_steps=4", "--resume=true", name="parts")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(5))
    assert_same_run(whole, resumed)


def test_torchrun_training_with_the_engine_matches_the_hf_loop(tmp_path):
    """Under torchrun --nproc_per_node=2 (gloo), train_fsdp.py --engine=vllm (an engine per rank, fed the full student
    after every step) gives --engine=hf's per-step losses and diagnostics within 1e-4 and the same greedy accuracy,
    and every rank exits cleanly after the engines close."""
    def fsdp(engine):
        out = tmp_path / f"fsdp_{engine}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "train_fsdp.py", *TINY, f"--engine={engine}", f"--cache_dir={tmp_path / 'cache'}",
                                 f"--out_dir={out}", "--eval_batch_size=4"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    hf, engine = fsdp("hf"), fsdp("vllm")
    assert [r["step"] for r in engine] == [r["step"] for r in hf] == list(range(5))
    assert_same_run(hf, engine)


def test_evaluate_with_the_engine_scores_known_answers(models_dir, benchmark_data, tmp_path):
    """evaluate.py --engine=vllm on two benchmarks' real schemas: a teacher trained on the sums gets pass@1 >= 0.9 and
    a random model <= 0.1, with n samples per problem from one request each."""
    data = benchmark_data
    keys = ["gsm8k", "aime24"]
    suite = test_evaluate.suite_file(tmp_path / "suite.yaml", keys)
    for model in ("teacher", "random"):
        test_evaluate.run_evaluate(f"--suite={suite}", f"--model={models_dir / model}", f"--out={tmp_path / model}",
                                   test_evaluate.data_flag(data, keys), "--engine=vllm")
        [entry] = json.loads((tmp_path / model / "eval.json").read_text())["models"]
        for key, result in entry["benchmarks"].items():
            assert result["n"] == 4 and result["tokens"] > 0, key
            assert (result["pass@1"] >= 0.9) if model == "teacher" else (result["pass@1"] <= 0.1), (model, key, result)


def test_a_calls_requests_and_samples_never_share_a_seed():
    """vLLM samples a request's n completions with seeds s + j (its ParentRequest makes the children); the seeds of a
    call's requests leave no overlap: 5 requests of 4 samples draw 20 distinct seeds (seed + i would draw 8)."""
    from vllm import SamplingParams
    from vllm.v1.engine.parallel_sampling import ParentRequest
    seeds = []
    for i, seed in enumerate(vllm_engine.request_seeds(123, requests=5, n=4)):
        parent = ParentRequest(SimpleNamespace(request_id=str(i), external_req_id=str(i),
                                               params=SamplingParams(n=4, seed=seed)))
        seeds += [parent.get_child_info(j)[1].seed for j in range(4)]
    assert len(seeds) == 20 and len(set(seeds)) == 20


def test_the_students_output_is_owned_before_the_teacher_runs():
    """The blended forward copies the student stack's output before the teacher's stack runs: a teacher that writes
    over the buffer the student's output lives in (a CUDA graph pool replayed, as vLLM's piecewise graphs can) leaves
    the returned student half as the student computed it, in storage of its own."""
    model_class = vllm_engine._model_class()
    model = model_class.__new__(model_class)
    torch.nn.Module.__init__(model)
    pool = torch.arange(6.0).reshape(3, 2)  # the student's output: a view into a shared buffer

    def teacher(input_ids, positions):
        pool.fill_(-1.0)  # the teacher's replay writes where the student's output lives
        return torch.zeros(3, 1)

    model.student, model.teacher, model.teacher_off = (lambda *args: pool[:, :]), teacher, False
    out = model.forward(torch.zeros(3, dtype=torch.long), torch.arange(3))
    assert torch.equal(out[:, :2], torch.arange(6.0).reshape(3, 2)) and out.shape == (3, 3)
    assert out.untyped_storage().data_ptr() != pool.untyped_storage().data_ptr()


def test_the_weight_sync_streams_and_gathers_a_tied_head_once(monkeypatch):
    """The weights reach the engine as a generator, every state-dict name once and in order, and a tied head is the
    embedding's tensor as gathered for it: one gather fewer (under FSDP, no second all-gather of the embedding)."""
    import inspect
    from distill import synthetic_task
    model = synthetic_task.tiny_qwen3(synthetic_task.char_tokenizer(), 1, 32, seed=0)  # tied embeddings
    gathers, full = [], vllm_engine._full
    monkeypatch.setattr(vllm_engine, "_full", lambda tensor: gathers.append(tensor) or full(tensor))
    pairs = vllm_engine.streamed(model, torch.bfloat16)
    assert inspect.isgenerator(pairs) and not gathers  # nothing gathered before the engine asks
    pairs = list(pairs)
    assert [name for name, _ in pairs] == list(model.state_dict()) and len(gathers) == len(pairs) - 1
    weights = dict(pairs)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    assert torch.equal(weights["lm_head.weight"], model.lm_head.weight.to(torch.bfloat16))


def test_vllm_refusing_its_memory_fraction_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys):
    """When vLLM refuses to start because the GPU's free memory is short of vllm_gpu_memory_utilization (its
    ValueError, as vllm/v1/worker/utils.py words it), the run stops with one line naming the key."""
    import vllm

    def refuse(**kwargs):
        raise ValueError("Free memory on device cuda:0 (3.1/79.1 GiB) on startup is less than desired GPU memory "
                         "utilization (0.9, 71.2 GiB). Decrease GPU memory utilization or reduce GPU memory used by "
                         "other processes.")

    monkeypatch.setattr(vllm, "LLM", refuse)
    cfg = SimpleNamespace(teacher="", seed=0, max_prompt_tokens=16, max_new_tokens=8, eval_max_new_tokens=8,
                          vllm_cpu_kv_cache_gib=1, vllm_gpu_memory_utilization=0.9)
    with pytest.raises(SystemExit) as stop:
        vllm_engine.Engine(cfg, qwen3(64, 2, 0), None, V, EOS, tmp_path, with_teacher=False)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: vllm_gpu_memory_utilization: vLLM cannot start with 0.9 of the GPU (Free memory")


def test_the_engine_benchmark_runs_and_writes_the_greedy_tokens_gpu_check_compares(tmp_path):
    """`python -m scripts.bench engine` at tiny CPU shapes: the HF loop in calls of --hf_rows, then the engine on the
    same prompts, both rates printed; --tokens_out writes the engine's greedy tokens at eps 0.5, which an --eager run
    (the engine gpu_check compares against) reproduces token for token here (on a CPU both are eager)."""
    run = lambda *extra: subprocess.run(
        [sys.executable, "-m", "scripts.bench", "engine", "--pairs=tiny:small", "--batch=4", "--new_tokens=8",
         "--hf_rows=2", "--prompt_tokens=16", "--runs=1", *extra], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    graphs, eager = run(f"--tokens_out={tmp_path / 'graphs.json'}"), run("--eager", f"--tokens_out={tmp_path / 'eager.json'}")
    assert graphs.returncode == 0 and eager.returncode == 0, graphs.stderr[-2000:] + eager.stderr[-2000:]
    rates = [line for line in graphs.stdout.splitlines() if "engine/HF" in line]
    assert len(rates) == 2 and "HF loop: 2 rows x 8 new tokens per call" in graphs.stdout
    assert "engine/HF" not in eager.stdout
    tokens = json.loads((tmp_path / "graphs.json").read_text())
    assert len(tokens) == 16 and all(len(row) == 128 for row in tokens)
    assert tokens == json.loads((tmp_path / "eager.json").read_text())
