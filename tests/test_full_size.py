"""
The full-size path on CPU: Qwen3's vocabulary and stop ids (a 151,669-entry tokenizer built here, heads padded to
151,936), the presets, thinking mode, evaluation batching, and what the loss forwards, rollouts and activation
checkpointing keep in memory. tests/test_fsdp.py covers the same under torchrun.
"""
import dataclasses
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_small  # noqa: E402
import trb  # noqa: E402
from distill import config, evaluation, math_data, models, synthetic_task  # noqa: E402
from conftest import BASE_EOS, CHAT_EOS, qwen3_args, qwen3_sized_model, qwen3_sized_tokenizer  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def test_export_keeps_every_stop_id_at_qwen3_sizes(qwen3_folders, tmp_path):
    """A real-size run (151,669-entry tokenizer, 151,936-row heads, Base student with a chat teacher) trains with
    both EOS ids merged into one stop event, and the exported student's generation_config stops at both."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    result = subprocess.run([sys.executable, "train_small.py", *qwen3_args(qwen3_folders, tmp_path / "run")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = GenerationConfig.from_pretrained(tmp_path / "run" / "student")
    assert exported.eos_token_id == [BASE_EOS, CHAT_EOS] and exported.pad_token_id == BASE_EOS
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.config.vocab_size == 151936


def test_prompt_only_training_data_trains(qwen3_folders, tmp_path):
    """A training .jsonl with a question field only (OpenThoughts3 has no answers) trains, with eval_dataset supplying
    the held-out answers; its prompts over max_prompt_tokens are dropped with a printed count."""
    questions = [f"What is {i}+{i}?" + " Think hard." * (20 if i % 3 == 0 else 0) for i in range(6)]
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"question": q}) + "\n" for q in questions)
    args = qwen3_args(qwen3_folders, tmp_path / "run", f"--dataset={tmp_path / 'prompts.jsonl'}",
                      f"--eval_dataset={qwen3_folders / 'gsm8k.jsonl'}", "--eval_split=train",
                      "--max_prompt_tokens=150")
    result = subprocess.run([sys.executable, "train_small.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dataset: dropped 2 of 6 training prompts over max_prompt_tokens=150" in result.stdout


def test_prompts_over_max_prompt_tokens_are_dropped_with_a_count(qwen3_folders, tmp_path, capsys):
    """Exactly the rows whose formatted prompt (system prompt and chat template included) is over max_prompt_tokens are
    dropped, from the training and the held-out set, with a printed count; if none is left, one line naming the key."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(qwen3_folders / "student")
    rows = [{"question": f"q{i} " + "long " * (30 * (i % 2)), "answer": str(i)} for i in range(10)]
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    cfg = real_config(qwen3_folders, f"--dataset={tmp_path / 'data.jsonl'}", "--eval_size=4")
    lengths = {r["question"]: len(tokenizer(math_data.format_prompt(r["question"], tokenizer, cfg))["input_ids"])
               for r in rows}
    limit = max(n for q, n in lengths.items() if "long" not in q)
    assert limit < min(n for q, n in lengths.items() if "long" in q)
    cfg = dataclasses.replace(cfg, max_prompt_tokens=limit)
    full_train, full_held_out = math_data.load_splits(cfg)
    train, held_out = math_data.load_run_splits(cfg, tokenizer)
    expected = lambda part: [q for q in part["question"] if lengths[q] <= limit]
    assert list(train["question"]) == expected(full_train) and list(held_out["question"]) == expected(full_held_out)
    assert 0 < len(held_out) < len(full_held_out) and list(held_out["answer"]) == [
        a for q, a in zip(full_held_out["question"], full_held_out["answer"]) if lengths[q] <= limit]
    dropped = lambda part, what: (f"dataset: dropped {len(part) - len(expected(part))} of {len(part)} {what} prompts "
                                  f"over max_prompt_tokens={limit}")
    out = capsys.readouterr().out
    assert dropped(full_train, "training") in out and dropped(full_held_out, "held-out") in out
    with pytest.raises(SystemExit):
        math_data.load_run_splits(dataclasses.replace(cfg, max_prompt_tokens=3), tokenizer)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: max_prompt_tokens: all "), err


def test_stop_ids_put_the_students_eos_first():
    """stop_token_ids: the student tokenizer's EOS (the one it emits) first, then the teacher's other ones."""
    tokenizer = qwen3_sized_tokenizer("<|endoftext|>", chat_template=False)
    student, teacher = qwen3_sized_model(BASE_EOS, 1, 0, hidden=16), qwen3_sized_model([CHAT_EOS, BASE_EOS], 1, 0, 16)
    assert models.stop_token_ids(tokenizer, student, teacher) == [BASE_EOS, CHAT_EOS]


def real_config(folders, *extra):
    return config.load_config(qwen3_args(folders, "unused", *extra))


@pytest.mark.parametrize("thinking", [True, False])
def test_thinking_switch_reaches_the_chat_template(qwen3_folders, thinking):
    """enable_thinking=false appends Qwen3's empty think block after the generation prompt; true leaves the prompt
    open (the template's default); a tokenizer without a chat template keeps the plain prompt either way."""
    from transformers import AutoTokenizer
    cfg = real_config(qwen3_folders, f"--enable_thinking={str(thinking).lower()}")
    chat = AutoTokenizer.from_pretrained(qwen3_folders / "teacher")
    prompt = math_data.format_prompt("What is 1+2?", chat, cfg)
    assert prompt.startswith("<|im_start|>system\nPlease reason step by step")
    assert prompt.endswith("<|im_start|>assistant\n" if thinking else "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    base = qwen3_sized_tokenizer("<|endoftext|>", chat_template=False)
    assert math_data.format_prompt("What is 1+2?", base, cfg) == f"{cfg.system_prompt}\n\nWhat is 1+2?\n"


def test_presets_load_and_real_models_refuse_the_embedded_defaults(capsys):
    """Every preset holds keys of config.yaml, in its order (the differences to its defaults), loads, and writes to its
    own runs/<preset> folder (relaunching one never meets another's checkpoints); a real model with config.yaml's
    embedded-task settings stops with one line naming the key and pointing to the presets."""
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"qwen3_1.7b_from_8b", "qwen3_0.6b_from_4b", "gsm8k_1gpu"}
    for path in presets:
        keys = [line.split(":")[0] for line in path.read_text().splitlines() if line and line[0].isalpha()]
        assert keys == [name for name in config.FIELDS if name in keys], path.name
        cfg = config.load_config([f"--config={path}"])
        assert cfg.student != "synthetic" and cfg.lr == 1e-5 and cfg.max_new_tokens >= 1024, path.name
        assert cfg.eval_max_new_tokens >= cfg.max_new_tokens and cfg.chunked_loss
        assert cfg.out_dir == f"runs/{path.stem}" and cfg.keep_checkpoints >= 2, path.name
    with pytest.raises(SystemExit):
        config.load_config(["--student=Qwen/Qwen3-0.6B-Base", "--teacher=Qwen/Qwen3-4B", "--dataset=openai/gsm8k"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: student:") and "configs/gsm8k_1gpu.yaml" in err[0]


def test_evaluation_decodes_at_most_eval_batch_size_rows_per_call(qwen3_folders, monkeypatch):
    """Evaluation never decodes more than eval_batch_size rows in one call, decodes eval_max_new_tokens, every
    problem n times for pass@1 and once greedily, and counts each exactly once (a grader that accepts one problem)."""
    from transformers import AutoTokenizer
    from distill import math_data
    tokenizer = AutoTokenizer.from_pretrained(qwen3_folders / "student")
    model = qwen3_sized_model(BASE_EOS, 1, 3, hidden=16)
    calls, real = [], trb.blended_generate

    def recording(*args, **kwargs):
        calls.append((args[2].shape[0], kwargs["max_new_tokens"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(trb, "blended_generate", recording)
    for rows in (3, 64):
        cfg = real_config(qwen3_folders, f"--eval_batch_size={rows}", "--eval_samples=2", "--eval_size=5",
                          "--eval_max_new_tokens=3")
        _, held_out = math_data.load_run_splits(cfg)
        target = held_out["answer"][0]
        monkeypatch.setattr(math_data, "is_correct", lambda text, answer, exact: answer == target)
        calls.clear()
        decoder = evaluation.HFDecoder(cfg, model, None, train_small.SingleDevice(), [tokenizer.eos_token_id],
                                       tokenizer.pad_token_id, len(tokenizer))
        result = evaluation.evaluate(decoder, tokenizer, held_out, cfg, 0, train_small.SingleDevice())
        assert result == {"pass@1": 1 / 5, "greedy": 1 / 5}
        assert all(n <= rows and tokens == 3 for n, tokens in calls), calls
        assert sum(n for n, _ in calls) == 5 * 2 + 5
    assert len(calls) == 2  # 64 rows: one call for the 5 x 2 samples, one for greedy


def test_loss_forwards_keep_no_cache_and_no_per_layer_hidden_states():
    """The loss forwards ask for neither a KV cache nor every layer's hidden states, the head multiplies only the
    positions the loss reads, and the hidden-state path returns the final norm's output at the completion positions,
    as output_hidden_states' last entry."""
    tokenizer = synthetic_task.char_tokenizer()
    model = synthetic_task.tiny_qwen3(tokenizer, 2, 32, seed=0).eval()
    seen = []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    sequences = torch.randint(3, len(tokenizer), (2, 9))
    mask = torch.ones_like(sequences)
    with torch.no_grad():
        hidden = train_small.forward_completions(model, sequences, mask, 4, len(tokenizer), hidden=True)
        logits = train_small.forward_completions(model, sequences, mask, 4, len(tokenizer), hidden=False)
        reference = model(input_ids=sequences, attention_mask=mask, output_hidden_states=True)
    for kwargs, out in seen[:2]:  # the two loss forwards (not the reference)
        assert kwargs["use_cache"] is False and not kwargs.get("output_hidden_states")
        assert out.cache is None and out.hidden_states is None
    assert seen[0][1].logits.shape[1] == 0  # the hidden-state path: the head multiplies no position
    assert seen[1][1].logits.shape[1] == 5  # the logits path: only the 5 positions that predict completion tokens
    torch.testing.assert_close(hidden, reference.hidden_states[-1][:, 3:-1], rtol=0, atol=0)  # the same ops
    torch.testing.assert_close(logits, reference.logits[:, 3:-1], rtol=1e-6, atol=1e-6)


def test_micro_batches_are_trimmed_to_their_own_rows():
    """A micro-batch drops the left padding all its rows share and the columns after its longest completion; its
    loss equals the untrimmed micro-batch's (masked columns change nothing in a causal model)."""
    tokenizer = synthetic_task.char_tokenizer()
    student = synthetic_task.tiny_qwen3(tokenizer, 1, 32, seed=0)
    teacher = synthetic_task.tiny_qwen3(tokenizer, 1, 32, seed=1)
    prompt_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    lengths = torch.tensor([2, 1, 6, 3])
    completion_mask = torch.arange(6)[None] < lengths[:, None]  # (4, N=6)
    sequences = torch.randint(3, len(tokenizer), (4, 10)) * torch.cat([prompt_mask, completion_mask.long()], 1)
    rollout = trb.Rollout(**{f.name: None for f in dataclasses.fields(trb.Rollout)})
    rollout.sequences, rollout.completion_mask = sequences, completion_mask
    mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    seqs, row_mask, cmask, p = train_small.trimmed(rollout, mask, slice(0, 2), 4)
    assert (seqs.shape, p, cmask.shape) == ((2, 2 + 2), 2, (2, 2))  # 2 shared pad columns and 4 unused ones dropped
    assert train_small.trimmed(rollout, mask, slice(2, 4), 4)[0].shape == (2, 4 + 6)
    V = len(tokenizer)

    def loss(s, m, c, p):
        return trb.opd_loss(train_small.forward_completions(student, s, m, p, V, False),
                            train_small.forward_completions(teacher, s, m, p, V, False), c)
    torch.testing.assert_close(loss(seqs, row_mask, cmask, p), loss(sequences[:2], mask[:2], completion_mask[:2], 4),
                               rtol=1e-5, atol=0)


def test_bf16_rollouts_run_a_bf16_copy_with_a_bf16_kv_cache():
    """With a bf16 compute dtype, rollouts run a bf16 copy of the float32 student, refreshed from it after each update
    (HFDecoder.sync): its KV cache is bf16. The float32 student under autocast would cache float32 keys (RMSNorm's float32 weight
    upcasts them), which is what the copy avoids."""
    from transformers import DynamicCache
    tokenizer = synthetic_task.char_tokenizer()
    student = synthetic_task.tiny_qwen3(tokenizer, 2, 32, seed=0)
    ids = torch.randint(3, len(tokenizer), (2, 5))

    def decoder(cfg):
        return evaluation.HFDecoder(cfg, student, None, train_small.SingleDevice(), [tokenizer.eos_token_id],
                                    tokenizer.pad_token_id, len(tokenizer))
    bf16 = decoder(dataclasses.replace(config.load_config([]), dtype="bfloat16"))

    def cache_dtypes(model):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, cache=cache, use_cache=True)
        return {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)}
    assert torch.float32 in cache_dtypes(student)  # the problem: autocast alone keeps float32 keys
    decoding = bf16.model
    assert cache_dtypes(decoding) == {torch.bfloat16}
    with torch.no_grad():
        student.model.norm.weight.add_(1.0)
    bf16.sync(student)
    assert bf16.model is decoding and torch.equal(
        decoding.model.norm.weight, student.model.norm.weight.to(torch.bfloat16))  # refreshed from the master
    assert decoder(config.load_config([])).model is student  # float32: no copy


def test_activation_checkpointing_recomputes_layers_with_the_same_gradients():
    """activation_checkpointing: each decoder layer's inside runs again in backward (its module hooks, where FSDP
    gathers, stay outside the recomputation), and the gradients equal the plain run's."""
    tokenizer = synthetic_task.char_tokenizer()
    ids = torch.randint(3, len(tokenizer), (2, 7))
    grads, forwards = {}, {}
    for on in (False, True):
        model = synthetic_task.tiny_qwen3(tokenizer, 2, 32, seed=0).train()
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        count = [0]
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).sum().backward()
        grads[on], forwards[on] = {n: p.grad for n, p in model.named_parameters()}, count[0]
    assert (forwards[False], forwards[True]) == (1, 2)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7)


def largest_allocation(run):
    """The largest single CPU allocation while run() runs (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def test_no_prefill_or_loss_forward_copies_the_head(qwen3_folders):
    """The models load_models returns never copy their heads: a prefill of 3 rows and the loss's hidden-state forward
    of 1 row (each keeping its positions by an index; a strided logits_to_keep=1 slice
    would make torch.matmul multiply by a per-row copy of the frozen head) allocate less than the (V, H) head."""
    cfg = real_config(qwen3_folders, "--dtype=bfloat16")
    _, _, teacher, _ = models.load_models(cfg, None, None)
    head = teacher.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and head.shape == (151936, 32)
    ids = torch.randint(0, 1000, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prefill = largest_allocation(lambda: trb.blended_generate(teacher, None, ids, mask, eps=0.0, max_new_tokens=2,
                                                                  temperature=0.0))
        loss_forward = largest_allocation(lambda: train_small.forward_completions(teacher, ids[:1], mask[:1], 5, 151669,
                                                                                  hidden=True))
    assert max(prefill, loss_forward) < head.nbytes, (prefill, loss_forward, head.nbytes)


def test_activation_checkpointing_key_reaches_the_student(qwen3_folders):
    """load_models turns on per-layer checkpointing of the student (never the frozen teacher) when the key says so."""
    cfg = real_config(qwen3_folders, "--activation_checkpointing=true")
    _, student, teacher, _ = models.load_models(cfg, None, None)
    assert student.is_activation_checkpointing and not teacher.is_activation_checkpointing


def test_collective_timeout_comes_from_config(monkeypatch):
    """train_fsdp.init_distributed passes dist_timeout_minutes to the process group (NCCL's default is 10 min)."""
    import train_fsdp
    seen = {}
    monkeypatch.setattr(train_fsdp.dist, "init_process_group", lambda backend, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(train_fsdp.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train_fsdp.dist, "get_world_size", lambda: 1)
    train_fsdp.init_distributed(90)
    assert seen["timeout"] == timedelta(minutes=90)
    assert config.load_config([]).dist_timeout_minutes >= 30


@pytest.fixture(scope="module")
def long_context_folders(tmp_path_factory):
    """A tiny student and teacher with Qwen3's rotary settings (head_dim 128, rope_theta 1e6) saved as float32
    folders, with a small tokenizer: what load_models reads for real models."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    root = tmp_path_factory.mktemp("long_context")
    tokenizer = synthetic_task.char_tokenizer()
    for name, seed in (("student", 1), ("teacher", 2)):
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                             num_attention_heads=1, num_key_value_heads=1, head_dim=128, rope_theta=1e6,
                             max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        Qwen3ForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_bf16_teacher_and_decoding_copy_keep_float32_rotary_frequencies(long_context_folders):
    """With a bf16 compute dtype the teacher and the student's decoding copy are bf16 but their rotary frequencies
    stay float32, so their logits at positions in the thousands equal those of from_pretrained(dtype=bf16): the same
    bf16 weights and float32 frequencies through the same kernels. A model whose inv_freq was rounded to bf16 (what
    nn.Module.to(bf16) does) is not."""
    from transformers import AutoModelForCausalLM
    cfg = config.load_config([f"--config={ROOT / 'configs' / 'gsm8k_1gpu.yaml'}", "--dtype=bfloat16",
                              f"--student={long_context_folders / 'student'}",
                              f"--teacher={long_context_folders / 'teacher'}"])
    _, student, teacher, _ = models.load_models(cfg, None, None)
    decoding = evaluation.HFDecoder(cfg, student, None, train_small.SingleDevice(), [0], 0, 18).model
    ids = torch.randint(3, 18, (1, 16))
    positions = torch.arange(3000, 3016)[None]  # (1, 16) far into the context

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, position_ids=positions).logits.float()
    for model, name in ((teacher, "teacher"), (decoding, "student")):
        assert model.dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
        reference = AutoModelForCausalLM.from_pretrained(long_context_folders / name, dtype=torch.bfloat16)
        assert reference.model.rotary_emb.inv_freq.dtype == torch.float32
        assert torch.equal(logits(model), logits(reference))
        rounded = reference.to(torch.bfloat16)  # nn.Module.to: inv_freq rounded to bf16
        assert rounded.model.rotary_emb.inv_freq.dtype == torch.bfloat16
        assert not torch.equal(logits(rounded), logits(model))


def test_the_sampler_never_copies_the_head_of_any_model(qwen3_folders):
    """blended_generate keeps each forward's last position by an index, so a frozen model loaded any way, here by a
    plain from_pretrained, allocates less than its (V, H) head in a 3-row prefill (a strided last position would make
    torch.matmul multiply by a per-row copy of it)."""
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(qwen3_folders / "teacher", dtype=torch.bfloat16).eval()
    teacher.requires_grad_(False)  # frozen, as a teacher is: then matmul takes the copying path
    head = teacher.get_output_embeddings().weight
    ids = torch.randint(0, 1000, (3, 9))
    with torch.no_grad():
        prefill = largest_allocation(lambda: trb.blended_generate(teacher, None, ids, torch.ones_like(ids), eps=0.0,
                                                                  max_new_tokens=2, temperature=0.0))
    assert prefill < head.nbytes, (prefill, head.nbytes)
