"""The memory plan: its exact terms against real models and caches, Qwen3's shapes, the presets against 80 GB, and
the whole plan against the measured peaks of a real run on CPU."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from distill import config, fast, memory_plan, vllm_engine
from scripts import memory_plan as plan_command

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"qwen3_1.7b_from_8b": 8, "qwen3_0.6b_from_4b": 8, "gsm8k_1gpu": 1}  # preset: its world size
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def tiny_qwen3_config(tied):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_and_kv_bytes_match_a_real_model(tmp_path, tied):
    """From a folder's config.json: the parameter count equals the real model's (tied embeddings once), and the KV
    bytes per token equal a real bf16 DynamicCache's, summed over layers, keys and values."""
    from transformers import DynamicCache, Qwen3ForCausalLM
    model = Qwen3ForCausalLM(tiny_qwen3_config(tied)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    cfg = config.load_config([])
    shape = memory_plan.Shape(memory_plan.model_config(str(tmp_path / "m"), cfg, "student")[0])
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.root_params + 3 * shape.layer_params == shape.params
    cache, tokens = DynamicCache(config=model.config), 7
    with torch.no_grad():
        model(input_ids=torch.randint(0, 300, (2, tokens)), cache=cache, use_cache=True)
    cached = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert shape.kv_per_token == cached / (2 * tokens)


@pytest.mark.parametrize("name, params, kv_kib", [("Qwen/Qwen3-0.6B-Base", 0.596e9, 112),
                                                   ("Qwen/Qwen3-1.7B-Base", 1.72e9, 112),
                                                   ("Qwen/Qwen3-4B", 4.02e9, 144), ("Qwen/Qwen3-8B", 8.19e9, 144)])
def test_builtin_qwen3_shapes(name, params, kv_kib):
    """Offline, Qwen3's names resolve to their published shapes (config.json): KV cache per token and size."""
    shape = memory_plan.Shape(memory_plan.builtin_qwen3(name))
    assert shape.kv_per_token == kv_kib * 1024 and shape.vocab == 151936
    assert abs(shape.params - params) <= 0.01 * params


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_fits_80_gib_at_every_moment(preset):
    """Every preset's plan stays under 90% of an 80 GiB GPU at every moment (10% left for fragmentation)."""
    cfg = config.load_config([f"--config={ROOT / 'configs' / f'{preset}.yaml'}"])
    result = memory_plan.plan(cfg, PRESETS[preset])
    assert all(total <= 0.9 * 80 * memory_plan.GiB for total in result["totals"].values()), result["totals"]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_engine_holds_its_fraction_while_it_decodes_and_nothing_while_the_loss_runs(preset):
    """With engine vllm, the rollout and evaluation peaks are the state at rest, the weight sync's one gathered
    parameter and the engine's fraction of the GPU (both models' bf16 weights, then its KV pool), with none of the HF
    loop's decoding terms; the loss moments hold no engine memory (it sleeps). By default (0) the fraction is what the
    GPU leaves beside the trainer less the margin, to the hundredth, so every moment fits under 90% of 80 GiB; a
    fraction set by hand is taken as it is, and one too small for both models' weights is flagged."""
    cfg = dataclasses.replace(config.load_config([f"--config={ROOT / 'configs' / f'{preset}.yaml'}"]), engine="vllm")
    assert cfg.vllm_gpu_memory_utilization == 0
    result = memory_plan.plan(cfg, PRESETS[preset])
    GiB, totals, moments = memory_plan.GiB, result["totals"], result["moments"]
    fraction = result["engine_fraction"]
    assert result["engine_beside"] == totals["at rest"] + moments["rollout peak"]["weight sync: one parameter gathered"]
    room = 0.9 * 80 * GiB - result["engine_beside"]
    assert room - 0.01 * 80 * GiB < fraction * 80 * GiB <= room
    assert totals["rollout peak"] == pytest.approx(result["engine_beside"] + fraction * 80 * GiB)
    assert totals["evaluation peak"] == totals["rollout peak"]
    assert moments["at rest"]["student bf16 copy for decoding"] == 0
    assert not any("engine" in term for term in moments["loss backward"])
    assert moments["rollout peak"]["vLLM engine: both models' weights (bf16)"] == 2 * (
        result["student_params"] + result["teacher_params"])
    assert all(total <= 0.9 * 80 * GiB for total in totals.values()) and not result["engine_short"]
    assert "0 in the config" in memory_plan.format_plan(result)
    by_hand = memory_plan.plan(dataclasses.replace(cfg, vllm_gpu_memory_utilization=0.3), PRESETS[preset])
    assert by_hand["engine_fraction"] == 0.3 and "set in the config" in memory_plan.format_plan(by_hand)
    assert memory_plan.plan(dataclasses.replace(cfg, vllm_gpu_memory_utilization=0.05), PRESETS[preset])[
        "engine_short"]


def test_a_run_on_a_gpu_gives_the_engine_the_plans_fraction_or_stops_in_one_line(capsys):
    """vllm_engine.memory_fraction, which a training run on a GPU calls before the engine starts, plans at the run's
    own model shapes and GPU size: the default (0) gives the plan's fraction with a line that says where it comes
    from, a fraction set by hand is kept, and a GPU too small for both models' weights beside the trainer stops the
    run with one line naming the key."""
    from transformers import Qwen3ForCausalLM
    cfg = dataclasses.replace(config.load_config([]), engine="vllm")
    student, teacher = Qwen3ForCausalLM(tiny_qwen3_config(True)), Qwen3ForCausalLM(tiny_qwen3_config(False))
    shapes = memory_plan.Shape(student.config), memory_plan.Shape(teacher.config)
    fraction, line = vllm_engine.memory_fraction(cfg, student, teacher, 8 * memory_plan.GiB)
    assert fraction == memory_plan.plan(cfg, 1, 8.0, *shapes)["engine_fraction"] and 0.5 < fraction < 0.9
    assert line.startswith(f"vllm_gpu_memory_utilization: {fraction} of 8.0 GiB") and "0 in the config" in line
    by_hand = dataclasses.replace(cfg, vllm_gpu_memory_utilization=0.4)
    assert vllm_engine.memory_fraction(by_hand, student, teacher, 8 * memory_plan.GiB)[0] == 0.4
    with pytest.raises(SystemExit) as stop:
        vllm_engine.memory_fraction(cfg, student, teacher, memory_plan.CUDA_CONTEXT)  # the context fills it
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: vllm_gpu_memory_utilization: 0.0 of the 2.0 GiB GPU (the memory plan's) cannot "
                             "hold both models'")


def test_sharding_divides_the_students_state_and_checkpointing_cuts_activations():
    """The student's weights and AdamW state divide by the shard group, a sharded teacher by the world, and
    activation checkpointing cuts the student's saved activations."""
    cfg = config.load_config([f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}"])
    rest = lambda world, **kw: memory_plan.plan(dataclasses.replace(cfg, **kw), world)["moments"]["at rest"]
    for term in ("student weights (fp32 master)", "AdamW state (2 x fp32)"):
        assert rest(8)[term] * 8 == rest(2)[term] * 2 == rest(8, hsdp_shard_size=2)[term] * 2
    assert rest(8, teacher_sharding="shard")["teacher weights (bf16)"] * 8 == rest(8)["teacher weights (bf16)"]
    training = lambda ac: memory_plan.plan(dataclasses.replace(cfg, activation_checkpointing=ac), 8)[
        "moments"]["loss backward"]["activations (student)"]
    assert training(True) < training(False) / 5


def test_plan_reads_max_prompt_tokens_and_static_cache_lengths():
    """The prompt length is the config's max_prompt_tokens; a static cache holds fast.static_cache_length positions
    per row, a dynamic one prompt + new tokens."""
    cfg = config.load_config([f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}"])
    shapes = {key: memory_plan.Shape(memory_plan.builtin_qwen3(getattr(cfg, key))) for key in ("student", "teacher")}
    per_token = shapes["student"].kv_per_token + shapes["teacher"].kv_per_token
    for cache, prompt in (("static", 1024), ("static", 1500), ("dynamic", 1500)):
        result = memory_plan.plan(dataclasses.replace(cfg, cache=cache, max_prompt_tokens=prompt), 8, **shapes)
        length = fast.static_cache_length(prompt, 7168) if cache == "static" else prompt + 7168
        assert result["tokens"]["prompt"] == prompt and result["tokens"]["rollout"] == length
        assert result["moments"]["rollout peak"]["KV caches (bf16)"] == 16 * length * per_token
    assert fast.static_cache_length(1500, 7168) == 10240 > 1500 + 7168


def test_compiled_decoding_keeps_the_largest_static_caches_at_every_moment():
    """compile: true keeps each model's last static cache through every moment: the student's larger of its rollout
    and evaluation caches, the teacher's rollout cache, both at rows padded to a power of two; compile: false keeps
    none."""
    cfg = config.load_config([f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}", "--rollout_batch_size=12",
                              "--eval_batch_size=20"])
    shapes = {key: memory_plan.Shape(memory_plan.builtin_qwen3(getattr(cfg, key))) for key in ("student", "teacher")}
    student, teacher = shapes["student"].kv_per_token, shapes["teacher"].kv_per_token
    compiled = memory_plan.plan(dataclasses.replace(cfg, compile=True), 8, **shapes)
    kept = (max(16 * fast.static_cache_length(1024, 7168), 32 * fast.static_cache_length(1024, 8192)) * student
            + 16 * fast.static_cache_length(1024, 7168) * teacher)
    assert all(terms["static KV caches kept (compile)"] == kept for terms in compiled["moments"].values())
    assert compiled["moments"]["rollout peak"]["KV caches (bf16)"] == 0  # the kept ones are the ones in use
    plain = memory_plan.plan(cfg, 8, **shapes)
    assert all(terms["static KV caches kept (compile)"] == 0 for terms in plain["moments"].values())


def test_plan_command_prints_the_table(tmp_path):
    """python -m scripts.memory_plan prints the table without a process group; a bad --world_size is one line."""
    result = subprocess.run([sys.executable, "-m", "scripts.memory_plan", "--world_size=8",
                             "--config=configs/qwen3_1.7b_from_8b.yaml"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loss backward" in result.stdout and "built-in Qwen3 shape" in result.stdout
    assert "1024 prompt (max_prompt_tokens)" in result.stdout
    assert "fits in 80 GiB" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "scripts.memory_plan", "--world_size=3",
                          "--config=configs/qwen3_1.7b_from_8b.yaml"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: world_size:")


@pytest.fixture(scope="module")
def reduced_qwen3(tmp_path_factory, qwen3_folders):
    """Qwen3-shaped random models cut to a CPU's size around the real 151,936-row head: a tied 2-layer 128-wide
    student (grouped 2:1 like 1.7B's heads), an untied 2-layer 256-wide teacher (4:1 like 8B's), Qwen3-sized
    tokenizers, and prompts of 1,450 to 1,770 tokens."""
    import json
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    from conftest import BASE_EOS, CHAT_EOS
    root = tmp_path_factory.mktemp("reduced")
    for name, hidden, heads, tied, eos in (("student", 128, 4, True, BASE_EOS),
                                           ("teacher", 256, 8, False, [CHAT_EOS, BASE_EOS])):
        config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                             num_attention_heads=heads, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tied,
                             max_position_embeddings=4096, pad_token_id=BASE_EOS, eos_token_id=eos, bos_token_id=None)
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
        model.generation_config.eos_token_id = eos
        model.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(qwen3_folders / name).save_pretrained(root / name)
    with open(root / "data.jsonl", "w") as f:
        f.writelines(json.dumps({"question": f"What is {k}+{k}?" + " pad" * (340 + 20 * (k % 5)),
                                 "answer": f"#### {2 * k}"}) + "\n" for k in range(40))
    return root


def test_plan_bounds_the_measured_peaks_of_a_reduced_qwen3_run(reduced_qwen3, tmp_path):
    """At every moment the plan (less the CUDA allowance) bounds the peak measured in a real train_small run on CPU
    (2 steps, bf16 autocast, static caches, TRB rollouts with the teacher, 2-row micro-batches with a mask) to within
    1% below and 25% above; what a moment adds to the state at rest is bounded to within 1 MiB below and 2.5x above."""
    args = [f"--config={ROOT / 'configs' / 'gsm8k_1gpu.yaml'}", f"--student={reduced_qwen3 / 'student'}",
            f"--teacher={reduced_qwen3 / 'teacher'}", f"--dataset={reduced_qwen3 / 'data.jsonl'}", "--dataset_config=",
            "--dtype=bfloat16", "--method=trb", "--eps0=0.1", "--warmup_steps=10", "--batch_size=4",
            "--rollouts_per_prompt=2", "--rollout_batch_size=8", "--micro_batch_size=2", "--max_new_tokens=16",
            "--eval_max_new_tokens=24", "--eval_batch_size=8", "--eval_size=4", "--eval_samples=2", "--eval_every=0",
            "--max_steps=2", "--checkpoint_every=0", "--shown_problems=0", "--loss_chunk_mib=9.3",
            "--max_prompt_tokens=1800", f"--out_dir={tmp_path / 'run'}"]
    cfg = config.load_config(args)
    shapes = {key: memory_plan.Shape(memory_plan.model_config(getattr(cfg, key), cfg, key)[0])
              for key in ("student", "teacher")}
    planned = memory_plan.plan(cfg, 1, **shapes)
    measured = plan_command.measure(cfg)
    print("\n" + plan_command.format_comparison(planned, measured))
    assert list(measured) == list(memory_plan.MOMENTS)
    context, MiB = memory_plan.CUDA_CONTEXT, 1024 ** 2
    plan = {m: planned["totals"][m] - context for m in measured}
    for m, value in measured.items():
        assert 0.99 * value <= plan[m] <= 1.25 * value, (m, value / MiB, plan[m] / MiB)
        above, planned_above = value - measured["at rest"], plan[m] - plan["at rest"]
        assert above - MiB <= planned_above <= 2.5 * above + MiB, (m, above / MiB, planned_above / MiB)


def test_train_fsdp_plan_prints_the_plan_and_the_engines_fraction_without_training(monkeypatch, capsys):
    """`python train_fsdp.py --plan` prints the memory plan of the launch it is given (world size from --world_size,
    else torchrun's WORLD_SIZE) with the vLLM engine's fraction, and starts nothing: no process group."""
    import train_fsdp
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(sys, "argv", ["train_fsdp.py", "--plan", "--engine=vllm",
                                      f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}"])
    train_fsdp.main()
    shown = capsys.readouterr().out
    cfg = config.load_config([f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}", "--engine=vllm"])
    fraction = memory_plan.plan(cfg, 8)["engine_fraction"]
    assert shown.startswith("train_fsdp.py, world size 8: student Qwen/Qwen3-1.7B-Base")
    assert f"vllm_gpu_memory_utilization: {fraction} of 80 GiB" in shown and "fits in 80 GiB" in shown
    assert not torch.distributed.is_initialized()
