"""
Shared fixtures and the test tiers. Each test module is in one tier, marked here:
    python -m pytest -q -m fast tests      # maths, sampler, fast decode, config, statistics, data: under a minute
    python -m pytest -q tests              # everything, as CI runs it (the smoke runs of both scripts, FSDP, ...)
"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import trb.py and the scripts from the root
from distill.qwen3 import BASE_EOS, CHAT_EOS, qwen3_sized_tokenizer  # noqa: E402,F401 (used by the tests)  # noqa: E402


def relative_weight_error(a, b):
    """
    The largest ||a[k] - b[k]|| / ||a[k]|| over the tensors of two state dicts (float64). Per tensor, not per element:
    AdamW's update is lr * g / (|g| + eps), so for a weight whose gradient is far below eps (1e-8) it multiplies the
    gradient's rounding error by lr / eps (5e4 at lr 5e-4). Two runs that sum gradients in another order then differ
    in a few isolated elements by ~1e-6 absolute, while the tensors agree to ~1e-7.
    """
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm()) for k in a)


def qwen3_sized_model(eos_token_id, layers, seed, hidden=32):
    """A tiny random Qwen3 with the real head width (151,936 rows, past the tokenizer) and the given stop ids."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=151643, eos_token_id=eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    return model


@pytest.fixture(scope="session")
def qwen3_folders(tmp_path_factory):
    """A Base student (EOS 151643, no chat template) and a chat teacher (EOS [151645, 151643], ChatML template),
    both with Qwen3's tokenizer size and 151,936-row heads, and a GSM8K-style .jsonl, in local folders."""
    root = tmp_path_factory.mktemp("qwen3")
    for name, eos, layers in (("student", BASE_EOS, 1), ("teacher", [CHAT_EOS, BASE_EOS], 2)):
        tokenizer = (qwen3_sized_tokenizer("<|endoftext|>", chat_template=False) if name == "student"
                     else qwen3_sized_tokenizer("<|im_end|>"))
        qwen3_sized_model(eos, layers, seed=layers).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with open(root / "gsm8k.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}) + "\n")
    return root


def qwen3_args(folders, out_dir, *extra):
    """The one-GPU preset on the Qwen3-sized folders, cut to a few CPU seconds by overrides."""
    return [f"--config={ROOT / 'configs' / 'gsm8k_1gpu.yaml'}", f"--student={folders / 'student'}",
            f"--teacher={folders / 'teacher'}", f"--dataset={folders / 'gsm8k.jsonl'}", "--dataset_config=",
            "--num_threads=1", "--batch_size=2", "--rollouts_per_prompt=2", "--max_new_tokens=4",
            "--eval_max_new_tokens=4", "--max_steps=1", "--eval_size=2", "--eval_samples=1", "--eval_every=0",
            "--checkpoint_every=0", "--rollout_batch_size=2", "--micro_batch_size=2", "--eval_batch_size=2",
            "--loss_chunk_mib=4.7", f"--out_dir={out_dir}", *extra]


def folder_state(path):
    """Every file under path with its size, modification time (ns) and SHA-256: equal states mean nothing in the
    folder was written, replaced or removed."""
    import hashlib
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns,
                                       hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(Path(path).rglob("*")) if f.is_file()}


FAST = {"test_math", "test_sampler", "test_fast_decode", "test_config", "test_compare", "test_math_data",
        "test_docstrings", "test_prepare_data", "test_plot_strengths",
        "test_results", "test_layers", "test_commands"}  # the fast tier: no script runs, no torchrun


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: the fast tier (python -m pytest -m fast tests)")
    config.addinivalue_line("markers", "slow: the rest: smoke runs of the scripts, torchrun, memory measurements")


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker("fast" if item.module.__name__.split(".")[-1] in FAST else "slow")
