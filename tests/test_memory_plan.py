"""The memory plan: its exact terms against real models and caches, Qwen3's shapes, and the presets against 80 GB."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import memory_plan

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
    """Offline, Qwen3's names resolve to their published shapes: KV cache per token (QWEN3_FACTS.md) and size."""
    shape = memory_plan.Shape(memory_plan.builtin_qwen3(name))
    assert shape.kv_per_token == kv_kib * 1024 and shape.vocab == 151936
    assert abs(shape.params - params) <= 0.01 * params


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_fits_80_gib_at_every_moment(preset):
    cfg = config.load_config([f"--config={ROOT / 'configs' / f'{preset}.yaml'}"])
    result = memory_plan.plan(cfg, PRESETS[preset])
    assert all(total <= 0.9 * 80 * memory_plan.GiB for total in result["totals"].values()), result["totals"]


def test_sharding_divides_the_students_state_and_checkpointing_cuts_activations():
    cfg = config.load_config([f"--config={ROOT / 'configs' / 'qwen3_1.7b_from_8b.yaml'}"])
    rest = lambda world, **kw: memory_plan.plan(dataclasses.replace(cfg, **kw), world)["moments"]["at rest"]
    for term in ("student weights (fp32 master)", "AdamW state (2 x fp32)"):
        assert rest(8)[term] * 8 == rest(2)[term] * 2 == rest(8, hsdp_shard_size=2)[term] * 2
    assert rest(8, teacher_sharding="shard")["teacher weights (bf16)"] * 8 == rest(8)["teacher weights (bf16)"]
    training = lambda ac: memory_plan.plan(dataclasses.replace(cfg, activation_checkpointing=ac), 8)[
        "moments"]["training peak"]["activations (student)"]
    assert training(True) < training(False) / 5


def test_plan_command_prints_the_table(tmp_path):
    """train_fsdp.py --plan prints the table without a process group; a bad --world_size is one line."""
    result = subprocess.run([sys.executable, "train_fsdp.py", "--plan", "--world_size=8",
                             "--config=configs/qwen3_1.7b_from_8b.yaml"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "training peak" in result.stdout and "built-in Qwen3 shape" in result.stdout
    assert "fits in 80 GiB" in result.stdout
    bad = subprocess.run([sys.executable, "train_fsdp.py", "--plan", "--world_size=3",
                          "--config=configs/qwen3_1.7b_from_8b.yaml"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: world_size:")
