"""
The embedded offline task of train_small.py (student = teacher = dataset = "synthetic"): no download, a few minutes
on a CPU.

  - task: a + b with up to `task_digits` digits, worked digit by digit from the right with the carry, ending in
    "#### <sum>" (the GSM8K answer convention), so the answer checker is the one used for real datasets;
  - tokenizer: a character-level Hugging Face tokenizer over the task's 15 characters + <pad>, <eos>, <unk>;
  - teacher: a 3-layer, 128-wide Qwen3 (0.8M parameters) trained from scratch by SFT on worked solutions, cached
    under cache_dir (held-out pass@1 0.98);
  - student: a 2-layer, 96-wide Qwen3 (0.3M parameters), random init (seeded by `seed`) plus a brief SFT (200
    steps) on 256 worked solutions. Why: a random student writes noise whose prefixes the teacher has never seen,
    so OPD has no useful signal; a student SFT'd to convergence leaves nothing to distil. The brief SFT teaches it
    the format (digit steps, carries, "####", <eos>) but not yet the arithmetic: its rollouts are well-formed and
    mostly wrong (pass@1 ~0.05, greedy ~0.25), the paper's setting of a weak base model next to a strong teacher.
    The init is cached per seed, so every method in --compare starts from the same weights.
"""
import hashlib
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import trb
from distill.checkpoints import save_atomically, write_atomically
from distill.config import die


def make_problem(rng, max_digits):
    """One a+b problem: question 'a+b=', worked solution '3+9+0=12;2+4+1=7;#### 712' (digits right to left)."""
    a, b = (rng.randrange(10 ** rng.randint(0, max_digits - 1), 10 ** max_digits) for _ in range(2))
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        steps.append(f"{x}+{y}+{carry}={x + y + carry}")
        carry = (x + y + carry) // 10
    return {"question": f"{a}+{b}=", "answer": ";".join(steps) + f";#### {a + b}"}


def splits(cfg):
    """Seeded train and held-out splits as datasets.Dataset, held-out questions disjoint from train."""
    from datasets import Dataset
    possible = (10 ** cfg.task_digits - 1) ** 2  # distinct questions: a, b in [1, 10^task_digits)
    if cfg.train_size + cfg.eval_size > possible:
        die(f"train_size: {cfg.train_size} training + {cfg.eval_size} held-out problems exceed the {possible} distinct "
            f"ones of task_digits={cfg.task_digits}")
    rng, seen, rows = random.Random(cfg.data_seed), set(), []
    while len(rows) < cfg.train_size + cfg.eval_size:
        row = make_problem(rng, cfg.task_digits)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    to_dataset = lambda part: Dataset.from_dict({k: [r[k] for r in part] for k in ("question", "answer")})
    return to_dataset(rows[:cfg.train_size]), to_dataset(rows[cfg.train_size:])


def char_tokenizer(alphabet="0123456789+=;# "):
    """Character-level PreTrainedTokenizerFast: <pad>=0, <eos>=1, <unk>=2, then one token per alphabet character.
    The default alphabet is exactly the synthetic task's, so no vocabulary row is one the models never see."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokens = ["<pad>", "<eos>", "<unk>"] + list(alphabet)
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def tiny_qwen3(tokenizer, layers, hidden, seed):
    """A randomly initialised Qwen3 causal LM (32-dim heads, tied embeddings), sized for a CPU."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                         num_key_value_heads=max(1, hidden // 32), head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def sft(model, tokenizer, rows, steps, lr, batch_size, seed, desc):
    """Supervised fine-tuning on worked solutions (loss on solution tokens and <eos> only), cosine lr decay."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        prompts = [tokenizer(r["question"])["input_ids"] for r in batch]
        full = [p + tokenizer(r["answer"])["input_ids"] + [tokenizer.eos_token_id] for p, r in zip(prompts, batch)]
        padded = tokenizer.pad({"input_ids": full}, return_tensors="pt")
        ids, mask = padded["input_ids"], padded["attention_mask"]  # (B, T), left-padded
        T = ids.shape[1]
        loss_mask = torch.zeros_like(mask, dtype=torch.bool)  # (B, T) True on solution tokens
        for i, (p, f) in enumerate(zip(prompts, full)):
            loss_mask[i, T - len(f) + len(p):] = True
        logits = model(input_ids=ids, attention_mask=mask, position_ids=trb.position_ids(mask)).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1][loss_mask[:, 1:]], ids[:, 1:][loss_mask[:, 1:]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    return model


# The config keys that determine each cached model: a change of any of them trains a new one.
TEACHER_KEYS = ("data_seed", "task_digits", "train_size", "teacher_layers", "teacher_hidden",
                "teacher_sft_steps", "teacher_sft_lr", "sft_batch_size")
EVAL_KEYS = ("data_seed", "task_digits", "train_size", "eval_size", "eval_samples", "eval_temperature",
             "eval_max_new_tokens")  # what the teacher's cached held-out scores depend on
STUDENT_KEYS = ("data_seed", "task_digits", "train_size", "student_layers", "student_hidden",
                "student_sft_examples", "student_sft_steps", "student_sft_lr", "sft_batch_size", "seed")


def config_hash(cfg, keys, tokenizer):
    """Short hash of what determines a cached model (keys and vocabulary): a change never reuses a stale cache."""
    values = {**{k: getattr(cfg, k) for k in keys}, "vocab": tokenizer.get_vocab()}
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def teacher(cfg, tokenizer, train, evaluate):
    """(teacher, its held-out scores): loaded from cache_dir, or trained by SFT on the full train split and saved
    there. The scores, evaluate(model), are cached beside it per evaluation setting (EVAL_KEYS)."""
    from transformers import AutoModelForCausalLM
    path = Path(cfg.cache_dir) / f"teacher-{config_hash(cfg, TEACHER_KEYS, tokenizer)}"
    if not path.exists():  # written atomically: it exists only when complete
        model = tiny_qwen3(tokenizer, cfg.teacher_layers, cfg.teacher_hidden, seed=cfg.data_seed)
        sft(model, tokenizer, train, cfg.teacher_sft_steps, cfg.teacher_sft_lr, cfg.sft_batch_size, cfg.data_seed,
            desc="teacher sft")
        save_atomically(path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    scores_path = path / f"eval-{config_hash(cfg, EVAL_KEYS, tokenizer)}.json"
    if not scores_path.exists():
        scores = evaluate(model)
        write_atomically(scores_path, json.dumps(scores))
        print(f"teacher: held-out pass@1 {scores['pass@1']:.3f}, greedy {scores['greedy']:.3f} ({path})")
    return model, json.loads(scores_path.read_text())


def student(cfg, tokenizer, train):
    """The student init for cfg.seed: random init + a brief SFT on a few examples, cached per seed."""
    from transformers import AutoModelForCausalLM
    path = Path(cfg.cache_dir) / f"student-{config_hash(cfg, STUDENT_KEYS, tokenizer)}"
    if not path.exists():
        model = tiny_qwen3(tokenizer, cfg.student_layers, cfg.student_hidden, seed=cfg.seed)
        examples = train.shuffle(seed=cfg.seed).select(range(min(cfg.student_sft_examples, len(train))))
        sft(model, tokenizer, list(examples), cfg.student_sft_steps, cfg.student_sft_lr, cfg.sft_batch_size,
            cfg.seed, desc=f"student init (seed {cfg.seed})")
        save_atomically(path, model.save_pretrained)
    return AutoModelForCausalLM.from_pretrained(path)
