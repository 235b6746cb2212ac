"""
On-policy distillation with Trust-Region Behavior Blending (TRB, arXiv 2605.31159) on one device.

The student learns by the OPD loss (E1, reverse KL to the frozen teacher on every visited prefix); the method only
changes who writes the rollouts: `trb.behavior(method, step, cfg)` picks the behavior policy (vanilla OPD, TRB's
annealed trust-region blend, fixed-eps, SKD, ...) and `trb.blended_generate` samples from it.

Launch (every config.yaml key can be overridden as --key=value):
    python train_small.py                                   # embedded offline default, CPU, a few minutes
    python train_small.py --method=opd --max_steps=60       # another behavior policy, shorter run
    python train_small.py --resume=true                     # continue from the last checkpoint in out_dir
    python train_small.py --compare=opd,trb,fixed_eps,skd --seeds=0,1,2 --out_dir=runs/compare
    python train_small.py --student=Qwen/Qwen3-0.6B-Base --teacher=Qwen/Qwen3-4B --dataset=openai/gsm8k \
        --dataset_config=main --max_new_tokens=1024 --lr=1e-5 --batch_size=16 --chunked_loss=true  # one GPU, bf16

The embedded default (student=teacher=dataset="synthetic") needs no download:
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
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import trb

# ----------------------------------------------------------------------------------------------------------------
# Configuration: config.yaml is the only source of values; the dataclass gives names and types (shared with
# train_fsdp.py).


@dataclass
class Config:
    method: str
    eps0: float
    warmup_steps: int
    temperature: float
    skd_top_k: int
    skd_temperature: float
    tau0: float
    max_steps: int
    batch_size: int
    rollouts_per_prompt: int
    max_new_tokens: int
    lr: float
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    grad_clip: float
    chunked_loss: bool
    loss_chunk_size: int
    loss_topk: int
    eval_every: int
    eval_size: int
    eval_samples: int
    eval_temperature: float
    eval_batch_size: int
    seed: int
    out_dir: str
    checkpoint_every: int
    resume: bool
    compare: str
    seeds: str
    student: str
    teacher: str
    dataset: str
    dataset_config: str
    train_split: str
    eval_split: str
    question_field: str
    answer_field: str
    system_prompt: str
    dtype: str
    num_threads: int
    trust_remote_code: bool
    cache_dir: str
    data_seed: int
    task_digits: int
    train_size: int
    teacher_layers: int
    teacher_hidden: int
    teacher_sft_steps: int
    teacher_sft_lr: float
    student_layers: int
    student_hidden: int
    student_sft_examples: int
    student_sft_steps: int
    student_sft_lr: float
    sft_batch_size: int
    teacher_sharding: str
    rollout_batch_size: int
    micro_batch_size: int


def die(message):
    """Stop with one line on stderr and a non-zero exit code (config and input errors: no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _looks_local(name):
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


# Range checks, applied after every override: (keys, predicate, what the message asks for).
CHECKS = [
    ("eps0 temperature max_steps lr_warmup_steps weight_decay loss_topk eval_every checkpoint_every num_threads "
     "teacher_sft_steps student_sft_steps", lambda v: v >= 0, ">= 0"),
    ("warmup_steps skd_top_k batch_size rollouts_per_prompt max_new_tokens loss_chunk_size eval_size eval_samples "
     "eval_batch_size train_size teacher_layers student_layers student_sft_examples sft_batch_size",
     lambda v: v >= 1, ">= 1"),
    ("skd_temperature tau0 lr grad_clip eval_temperature teacher_sft_lr student_sft_lr", lambda v: v > 0, "> 0"),
    ("adam_beta1 adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("teacher_hidden student_hidden", lambda v: v >= 32, ">= 32"),
    ("task_digits", lambda v: 1 <= v <= 9, "in [1, 9]"),
    ("dtype", lambda v: v in ("auto", "float32", "bfloat16"), "one of auto, float32, bfloat16"),
    ("rollout_batch_size micro_batch_size", lambda v: v >= 0, ">= 0 (0 = all of a rank's rows)"),
    ("teacher_sharding", lambda v: v in ("replicate", "shard"), "replicate or shard"),
]


def parse_value(key, raw, kind):
    """Convert a --key=value string to the field's type, or stop with a message naming the key."""
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        return kind(raw)
    except ValueError:
        die(f"{key}: expected {kind.__name__}, got {raw!r}")


def load_config(argv):
    """config.yaml (or --config=PATH), then --key=value overrides; every value type- and range-checked."""
    args = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            die(f"arguments must look like --key=value, got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        args[key] = raw
    path = args.pop("config", str(Path(__file__).with_name("config.yaml")))
    if not os.path.isfile(path):
        die(f"config: file {path!r} does not exist")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for key in list(values) + list(args):
        if key not in fields:
            die(f"{key}: unknown config key")
    for key, kind in fields.items():
        if key in args:
            values[key] = parse_value(key, args[key], kind)
        elif key not in values:
            die(f"{key}: missing from {path}")
        value = values[key]
        if kind is float and type(value) is int:
            values[key] = value = float(value)
        if value is None and kind is str:
            values[key] = value = ""
        if type(value) is not kind:
            die(f"{key}: expected {kind.__name__}, got {value!r}")
        for keys, valid, requirement in CHECKS:
            if key in keys.split() and not valid(value):
                die(f"{key}: must be {requirement}, got {value!r}")
    cfg = Config(**values)
    for key, method in [("method", cfg.method)] + [("compare", m) for m in cfg.compare.split(",") if m]:
        if method not in trb.BEHAVIOR_POLICIES:
            die(f"{key}: unknown behavior policy {method!r} (one of {', '.join(trb.BEHAVIOR_POLICIES)})")
    if not re.fullmatch(r"\d+(,\d+)*", cfg.seeds):
        die(f"seeds: expected comma-separated integers, got {cfg.seeds!r}")
    for key in ("student", "teacher", "dataset"):
        name = getattr(cfg, key)
        if name != "synthetic" and _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
            die(f"{key}: path {name!r} does not exist")
    synthetic = [k for k in ("student", "teacher", "dataset") if getattr(cfg, k) == "synthetic"]
    if synthetic and len(synthetic) < 3:
        die(f"{synthetic[0]}: 'synthetic' needs student, teacher and dataset all 'synthetic'")
    return cfg


def config_hash(cfg, keys, tokenizer):
    """Short hash of what determines a cached model (keys and vocabulary): a change never reuses a stale cache."""
    values = {**{k: getattr(cfg, k) for k in keys}, "vocab": tokenizer.get_vocab()}
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------------
# Task: the synthetic addition dataset, the character tokenizer, real datasets, answer checking.


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


def synthetic_splits(cfg):
    """Seeded train and held-out splits as datasets.Dataset, held-out questions disjoint from train."""
    from datasets import Dataset
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


def load_splits(cfg):
    """(train, held-out) datasets with the question and answer fields; real datasets from the hub or local files."""
    if cfg.dataset == "synthetic":
        return synthetic_splits(cfg)
    import datasets
    datasets.disable_progress_bars()  # stderr stays clean: errors below must be one line
    name = os.path.expanduser(cfg.dataset)
    try:
        if any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json")):
            data = datasets.load_from_disk(name)
        elif os.path.isfile(name):
            data = datasets.load_dataset("json", data_files=name)
        else:
            data = datasets.load_dataset(name, cfg.dataset_config or None)
    except Exception as error:  # noqa: BLE001 - any loader failure becomes one line naming the key
        die(f"dataset: cannot load {cfg.dataset!r}: {(str(error).splitlines() or [type(error).__name__])[0]}")
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({cfg.train_split: data})
    if cfg.eval_split not in data and len(data) == 1:  # a single split: hold out eval_size of its rows
        only = next(iter(data.values()))
        parts = only.train_test_split(test_size=min(cfg.eval_size, len(only) // 2), seed=cfg.data_seed)
        data = datasets.DatasetDict({cfg.train_split: parts["train"], cfg.eval_split: parts["test"]})
    for key in ("train_split", "eval_split"):
        if getattr(cfg, key) not in data:
            die(f"{key}: split {getattr(cfg, key)!r} not in {cfg.dataset!r} (splits: {', '.join(data)})")
    train, held_out = data[cfg.train_split], data[cfg.eval_split]
    for field in (cfg.question_field, cfg.answer_field):
        if field not in train.column_names or field not in held_out.column_names:
            die(f"dataset: no field {field!r} in {cfg.dataset!r} (columns: {', '.join(train.column_names)})")
    names = {k: v for k, v in {cfg.question_field: "question", cfg.answer_field: "answer"}.items() if k != v}
    rename = lambda d: d.select_columns([cfg.question_field, cfg.answer_field]).rename_columns(names)
    return rename(train), rename(held_out).select(range(min(cfg.eval_size, len(held_out))))


def extract_answer(text):
    """Final answer of a solution: the last \\boxed{...} (braces matched), else the last '#### n', else None."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return normalize_answer(text[i:j])
        return None
    found = re.findall(r"####\s*([^\n]*)", text)
    return normalize_answer(found[-1]) if found else None


def normalize_answer(answer):
    return answer.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")


def reference_answer(answer):
    """Ground truth from a dataset answer: '#### n' or \\boxed{} when present, else the whole string."""
    extracted = extract_answer(answer)
    return extracted if extracted is not None else normalize_answer(answer)


def format_prompt(question, tokenizer, cfg):
    """Synthetic task: the question itself. Real data: the paper's system prompt, via the chat template if any."""
    if cfg.dataset == "synthetic":
        return question
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{cfg.system_prompt}\n\n{question}\n"


def encode_prompts(prompts, tokenizer, device):
    """Left-padded prompt batch: input_ids, attention_mask (B, P)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


# ----------------------------------------------------------------------------------------------------------------
# Models: the synthetic teacher and student (trained and cached on first use), or any Hugging Face causal LM.


def device_and_dtype(cfg):
    """The device, and the compute dtype of forward passes (autocast; the student's weights stay float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


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


TEACHER_KEYS = ("data_seed", "task_digits", "train_size", "teacher_layers", "teacher_hidden",
                "teacher_sft_steps", "teacher_sft_lr", "sft_batch_size")
STUDENT_KEYS = ("data_seed", "task_digits", "train_size", "student_layers", "student_hidden",
                "student_sft_examples", "student_sft_steps", "student_sft_lr", "sft_batch_size", "seed")


def synthetic_teacher(cfg, tokenizer, train, held_out):
    """The synthetic teacher: loaded from cache_dir, or trained by SFT on the full train split and saved there."""
    from transformers import AutoModelForCausalLM
    path = Path(cfg.cache_dir) / f"teacher-{config_hash(cfg, TEACHER_KEYS, tokenizer)}"
    if not (path / "eval.json").exists():
        model = tiny_qwen3(tokenizer, cfg.teacher_layers, cfg.teacher_hidden, seed=cfg.data_seed)
        sft(model, tokenizer, train, cfg.teacher_sft_steps, cfg.teacher_sft_lr, cfg.sft_batch_size, cfg.data_seed,
            desc="teacher sft")
        scores = evaluate(model, tokenizer, held_out, cfg, seed=cfg.data_seed)
        save_atomically(path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp),
                                           (tmp / "eval.json").write_text(json.dumps(scores))))
        print(f"teacher trained: held-out pass@1 {scores['pass@1']:.3f}, greedy {scores['greedy']:.3f} -> {path}")
    return AutoModelForCausalLM.from_pretrained(path).eval(), json.loads((path / "eval.json").read_text())


def synthetic_student(cfg, tokenizer, train):
    """The synthetic student init for cfg.seed: random init + a brief SFT on a few examples, cached per seed."""
    from transformers import AutoModelForCausalLM
    path = Path(cfg.cache_dir) / f"student-{config_hash(cfg, STUDENT_KEYS, tokenizer)}"
    if not path.exists():
        model = tiny_qwen3(tokenizer, cfg.student_layers, cfg.student_hidden, seed=cfg.seed)
        examples = train.shuffle(seed=cfg.seed).select(range(min(cfg.student_sft_examples, len(train))))
        sft(model, tokenizer, list(examples), cfg.student_sft_steps, cfg.student_sft_lr, cfg.sft_batch_size,
            cfg.seed, desc=f"student init (seed {cfg.seed})")
        save_atomically(path, model.save_pretrained)
    return AutoModelForCausalLM.from_pretrained(path)


def load_pretrained(key, name, cfg, dtype):
    """A hub name or local folder as a causal LM; any loading failure is one line naming the key."""
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), dtype=dtype,
                                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        die(f"{key}: cannot load {name!r}: {str(error).splitlines()[0]}")


def load_models(cfg, train, held_out):
    """(tokenizer, student, teacher, teacher_scores). Teacher frozen: eval mode, no grad."""
    device, dtype = device_and_dtype(cfg)
    if cfg.student == "synthetic":
        tokenizer = char_tokenizer()
        teacher, teacher_scores = synthetic_teacher(cfg, tokenizer, train, held_out)
        student = synthetic_student(cfg, tokenizer, train)
    else:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.student),
                                                      trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as error:
            die(f"student: cannot load a tokenizer from {cfg.student!r}: {str(error).splitlines()[0]}")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        try:
            trb.check_same_vocab(tokenizer, AutoTokenizer.from_pretrained(os.path.expanduser(cfg.teacher),
                                                                          trust_remote_code=cfg.trust_remote_code))
        except (OSError, ValueError) as error:
            die(f"teacher: {str(error).splitlines()[0]}")
        student = load_pretrained("student", cfg.student, cfg, torch.float32)
        teacher, teacher_scores = load_pretrained("teacher", cfg.teacher, cfg, dtype), None
    teacher.requires_grad_(False)
    # float32 master weights for the student: AdamW steps of lr 1e-5 vanish in bf16 rounding; compute runs in `dtype`
    return tokenizer, student.to(device, torch.float32), teacher.to(device, dtype).eval(), teacher_scores


def autocast(cfg):
    """Mixed precision for forwards and rollouts when the compute dtype is not float32 (bf16 on GPU by default)."""
    device, dtype = device_and_dtype(cfg)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def stop_token_ids(tokenizer, *models):
    """The student tokenizer's EOS first (the one emitted), then every other EOS id of the models (Qwen3-Base and
    chat models differ): trb merges them into one stop event (PAPER.md section 4)."""
    ids = []
    for model in models:
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids += eos if isinstance(eos, list) else [eos]
    return [tokenizer.eos_token_id] + sorted({i for i in ids if i is not None} - {tokenizer.eos_token_id})


# ----------------------------------------------------------------------------------------------------------------
# Distillation step and evaluation.


def lr_at(step, cfg):
    """Paper schedule: cosine warmup over lr_warmup_steps, then constant."""
    if step >= cfg.lr_warmup_steps:
        return cfg.lr
    return cfg.lr * 0.5 * (1 - math.cos(math.pi * (step + 1) / (cfg.lr_warmup_steps + 1)))


def make_optimizer(student, cfg):
    return torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


def train_questions(train, step, cfg):
    """Questions for one step: epoch-wise seeded permutations, so the data position is a function of the step."""
    start = step * cfg.batch_size
    rows = []
    for position in range(start, start + cfg.batch_size):
        epoch, index = divmod(position, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        rows.append(train[int(order[index])]["question"])
    return rows


def forward_completions(model, sequences, mask, P, V, hidden):
    """Logits (B, N, V) or last hidden states (B, N, H) at the positions that predict the N completion tokens."""
    if hidden:  # through the root forward (not model.base_model), so that FSDP's root hooks gather embeddings and head
        out = model(input_ids=sequences, attention_mask=mask, position_ids=trb.position_ids(mask),
                    output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1][:, P - 1:-1]  # (B, N, H) after the final norm
    out = model(input_ids=sequences, attention_mask=mask, position_ids=trb.position_ids(mask))
    return out.logits[:, P - 1:-1, :V]


def teacher_view_sums(teacher_logits, tokens, mask):
    """Sums over completion tokens (mask (B, N)) of log pi_T(sampled token) and of the teacher's entropy, from
    teacher_logits (B, N, V): the diagnostics of PAPER.md section 7, for every method (even when the rollout did not
    run the teacher)."""
    log_pt = torch.log_softmax(teacher_logits.float(), -1)  # (B, N, V)
    logprob = log_pt.gather(-1, tokens[..., None])[..., 0][mask].sum().item()
    entropy = -(log_pt.exp() * log_pt.nan_to_num(neginf=0.0)).sum(-1)[mask].sum().item()
    return logprob, entropy


def train_step(student, teacher, tokenizer, optimizer, questions, step, cfg, generator, eos_ids):
    """One OPD update: rollouts from the behavior policy, then the E1 loss on the student's own forward pass."""
    device = next(student.parameters()).device
    V = len(tokenizer)  # shared tokenizer range: heads may be wider (padded vocab)
    started = time.time()
    kwargs = trb.behavior(cfg.method, step, cfg)  # eps from kl_budget (E5), temperature, token rule of `method`
    prompts = [format_prompt(q, tokenizer, cfg) for q in questions]
    input_ids, prompt_mask = (x.repeat_interleave(cfg.rollouts_per_prompt, 0)  # (B, P), B = prompts * rollouts
                              for x in encode_prompts(prompts, tokenizer, device))
    P = input_ids.shape[1]
    student.eval()
    with autocast(cfg):
        # 1) rollouts from the behavior policy (the teacher decodes in lockstep only when the policy needs it)
        rollout = trb.blended_generate(student, teacher if trb.behavior_needs_teacher(kwargs) else None, input_ids,
                                       prompt_mask, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids,
                                       pad_token_id=tokenizer.pad_token_id, generator=generator, vocab_size=V,
                                       **kwargs)
        mask = torch.cat([prompt_mask, rollout.completion_mask.long()], 1)  # (B, P+N)
        # 2) teacher and student forwards on the sampled sequences (the rollout is data: no gradient through it)
        student.train()
        with torch.no_grad():
            teacher_out = forward_completions(teacher, rollout.sequences, mask, P, V, cfg.chunked_loss)
        student_out = forward_completions(student, rollout.sequences, mask, P, V, cfg.chunked_loss)
        # 3) E1: reverse KL to the teacher at every completion token, mean over tokens
        if cfg.chunked_loss:
            loss = trb.chunked_opd_loss(student_out, student.get_output_embeddings().weight[:V], teacher_out,
                                        teacher.get_output_embeddings().weight[:V], rollout.completion_mask,
                                        chunk_size=cfg.loss_chunk_size, topk=cfg.loss_topk, eos_ids=eos_ids)
        else:  # the same single stop event as in the rollout
            student_out, teacher_out = (trb.canonicalise_eos(x, eos_ids) for x in (student_out, teacher_out))
            loss = trb.opd_loss(student_out, teacher_out, rollout.completion_mask, topk=cfg.loss_topk)
    # 4) AdamW step with grad-norm clipping, lr from the warmup schedule
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    optimizer.step()
    stats = rollout.stats()
    metrics = {"step": step + 1, "loss": loss.item(), "eps": kwargs["eps"], "temperature": kwargs["temperature"],
               "beta": stats["beta"], "realised_kl": stats["realised_kl"], "replaced_frac": stats["replaced_frac"],
               "teacher_logprob": stats["teacher_logprob"], "teacher_entropy": stats["teacher_entropy"],
               "completion_tokens": stats["completion_tokens"], "grad_norm": grad_norm.item(), "lr": lr_at(step, cfg)}
    if not cfg.chunked_loss:  # the teacher's view of the visited tokens for every method, from the loss forward
        logprob, entropy = teacher_view_sums(teacher_out, rollout.sequences[:, P:], rollout.completion_mask)
        n = stats["completion_tokens"]
        metrics["teacher_logprob"], metrics["teacher_entropy"] = (logprob / n, entropy / n) if n else (math.nan,) * 2
    metrics["tokens_per_s"] = stats["completion_tokens"] / (time.time() - started)
    return metrics


@torch.no_grad()
def evaluate(model, tokenizer, held_out, cfg, seed, eos_ids=None):
    """Held-out pass@1 = mean over problems of c/n (n = eval_samples at eval_temperature), and greedy accuracy."""
    device = next(model.parameters()).device
    eos_ids = eos_ids or [tokenizer.eos_token_id]
    generator = torch.Generator(device).manual_seed(seed)  # own generator: evaluation never shifts training RNG
    was_training = model.training
    model.eval()
    questions = [format_prompt(q, tokenizer, cfg) for q in held_out["question"]]
    answers = [reference_answer(a) for a in held_out["answer"]]
    scores = {}
    for name, n, temperature in (("pass@1", cfg.eval_samples, cfg.eval_temperature), ("greedy", 1, 0.0)):
        per_batch = max(1, cfg.eval_batch_size // n)
        correct = 0
        for i in tqdm(range(0, len(questions), per_batch), desc=f"eval rollouts ({name})", leave=False):
            batch = encode_prompts(questions[i:i + per_batch], tokenizer, device)
            input_ids, mask = (x.repeat_interleave(n, 0) for x in batch)  # (n * prompts, P)
            with autocast(cfg):
                rollout = trb.blended_generate(model, None, input_ids, mask, eps=0.0,
                                               max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                                               eos_token_id=eos_ids,
                                               pad_token_id=tokenizer.pad_token_id, generator=generator,
                                               vocab_size=len(tokenizer))
            texts = tokenizer.batch_decode(rollout.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
            correct += sum(extract_answer(t) == answers[i + j // n] for j, t in enumerate(texts))
        scores[name] = correct / (n * len(questions))
    model.train(was_training)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <out_dir>/checkpoints/step_XXXXXX, written to a temporary folder first, then renamed (atomic).


def save_atomically(path, write):
    """write(tmp) fills a temporary folder that is renamed to `path` only when complete."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_checkpoint(out_dir, step, student, optimizer, generator):
    """Student (safetensors), optimizer, step, data position and RNG states; older checkpoints removed after."""
    root = Path(out_dir) / "checkpoints"
    state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "sampler_rng": generator.get_state()}
    save_atomically(root / f"step_{step:06d}", lambda tmp: (student.save_pretrained(tmp / "student"),
                                                           torch.save(optimizer.state_dict(), tmp / "optimizer.pt"),
                                                           torch.save(state, tmp / "state.pt")))
    for old in root.glob("step_*"):
        if old.name != f"step_{step:06d}":
            shutil.rmtree(old)


def latest_checkpoint(out_dir):
    """The newest complete checkpoint (temporary folders of an interrupted save are ignored), or None."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def load_checkpoint(path, cfg, student_like, generator):
    """(student, optimizer, step): restores weights, optimizer, RNG states; the data position follows the step."""
    from transformers import AutoModelForCausalLM
    student = AutoModelForCausalLM.from_pretrained(path / "student", dtype=student_like.dtype).to(student_like.device)
    optimizer = make_optimizer(student, cfg)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = torch.load(path / "state.pt", weights_only=True)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    generator.set_state(state["sampler_rng"])
    return student, optimizer, state["step"]


# ----------------------------------------------------------------------------------------------------------------
# Training run and comparison.


def train(cfg):
    """One distillation run; writes metrics.jsonl, summary.json and the final student to out_dir."""
    started = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    train_split, held_out = load_splits(cfg)
    tokenizer, student, teacher, teacher_scores = load_models(cfg, train_split, held_out)
    device = next(student.parameters()).device
    eos_ids = stop_token_ids(tokenizer, student, teacher)
    generator = torch.Generator(device).manual_seed(cfg.seed)  # the rollout sampler's RNG
    optimizer, start = make_optimizer(student, cfg), 0
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        student, optimizer, start = load_checkpoint(checkpoint, cfg, student, generator)
        print(f"resumed from {checkpoint}")
    history = []  # on resume: the rows logged up to the checkpoint (later ones, and a half-written line, are dropped)
    if checkpoint is not None and (out / "metrics.jsonl").exists():
        history = [json.loads(line) for line in open(out / "metrics.jsonl") if line.endswith("\n")]
        history = [row for row in history if row["step"] <= start]
    with open(out / "metrics.jsonl", "w") as log:
        for row in history:
            log.write(json.dumps(row) + "\n")
        if start == 0:
            row = {"step": 0, "eps": trb.behavior(cfg.method, 0, cfg)["eps"], "beta": 0.0,
                   **evaluate(student, tokenizer, held_out, cfg, seed=cfg.seed, eos_ids=eos_ids)}
            print(f"step 0: pass@1 {row['pass@1']:.3f} greedy {row['greedy']:.3f}")
            history.append(row)
            log.write(json.dumps(row) + "\n")
        bar = tqdm(range(start, cfg.max_steps), desc=f"distill {cfg.method} seed {cfg.seed}", initial=start,
                   total=cfg.max_steps)
        for step in bar:
            questions = train_questions(train_split, step, cfg)
            row = train_step(student, teacher, tokenizer, optimizer, questions, step, cfg, generator, eos_ids)
            if (cfg.eval_every and row["step"] % cfg.eval_every == 0) or row["step"] == cfg.max_steps:
                row.update(evaluate(student, tokenizer, held_out, cfg, seed=cfg.seed + row["step"], eos_ids=eos_ids))
                tqdm.write(f"step {row['step']}: pass@1 {row['pass@1']:.3f} greedy {row['greedy']:.3f}")
            history.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", eps=f"{row['eps']:.3f}", beta=f"{row['beta']:.3f}")
            if cfg.checkpoint_every and row["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(out, row["step"], student, optimizer, generator)
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    evals = [row for row in history if "pass@1" in row]
    best = max(evals, key=lambda row: row["pass@1"])
    summary = {"method": cfg.method, "seed": cfg.seed, "steps": cfg.max_steps, "initial_pass@1": evals[0]["pass@1"],
               "final_pass@1": evals[-1]["pass@1"], "final_greedy": evals[-1]["greedy"], "best_pass@1": best["pass@1"],
               "best_step": best["step"], "teacher": teacher_scores, "wall_s": round(time.time() - started, 1),
               "config": dataclasses.asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return history


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def compare(cfg):
    """Every method in cfg.compare for every seed in cfg.seeds (same teacher, same per-seed student init)."""
    methods, seeds = cfg.compare.split(","), [int(s) for s in cfg.seeds.split(",")]

    def run(method, seed):  # with --resume=true, finished runs are read back and interrupted ones continue
        out_dir = f"{cfg.out_dir}/{method}_seed{seed}"
        run_cfg = dataclasses.replace(cfg, method=method, seed=seed, compare="", out_dir=out_dir)
        if cfg.resume and (Path(run_cfg.out_dir) / "summary.json").exists():
            return [json.loads(line) for line in open(Path(run_cfg.out_dir) / "metrics.jsonl")]
        return train(run_cfg)

    runs = {m: [run(m, s) for s in seeds] for m in methods}
    lines = ["| method | final pass@1 | best pass@1 | final greedy | teacher log-prob (warmup) | final pass@1 per seed |",
             "|---|---|---|---|---|---|"]
    results = {}
    for m, histories in runs.items():
        evals = [[row for row in h if "pass@1" in row] for h in histories]
        final, best = [e[-1]["pass@1"] for e in evals], [max(r["pass@1"] for r in e) for e in evals]
        greedy = [e[-1]["greedy"] for e in evals]
        warm = [r["teacher_logprob"] for h in histories for r in h if 0 < r["step"] <= cfg.warmup_steps]
        results[m] = {"seeds": seeds, "final": final, "best": best, "final_greedy": greedy,
                      "final_mean": mean_std(final)[0], "final_std": mean_std(final)[1],
                      "best_mean": mean_std(best)[0], "best_std": mean_std(best)[1],
                      "teacher_logprob_warmup": sum(warm) / len(warm) if warm else None}
        cell = lambda xs: "{:.3f} ± {:.3f}".format(*mean_std(xs))
        per_seed = ", ".join(f"{x:.3f}" for x in final)
        lines.append(f"| {m} | {cell(final)} | {cell(best)} | {cell(greedy)} | "
                     f"{results[m]['teacher_logprob_warmup'] or math.nan:.3f} | {per_seed} |")
    out = Path(cfg.out_dir)
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    initial = [h[0]["pass@1"] for h in next(iter(runs.values()))]
    note = (f"\nHeld-out pass@1 (n={cfg.eval_samples}, T={cfg.eval_temperature}), mean ± std over seeds {cfg.seeds}, "
            f"initial student {mean_std(initial)[0]:.3f} ± {mean_std(initial)[1]:.3f}, "
            f"{cfg.max_steps} steps, eps0={cfg.eps0}, warmup_steps={cfg.warmup_steps}. Teacher log-prob: mean log pi_T "
            f"of rollout tokens over the first warmup_steps steps.\n")
    (out / "comparison.md").write_text("\n".join(lines) + "\n" + note)
    plot_comparison(runs, out / "comparison.png", cfg)
    print("\n".join(lines) + "\n" + note)


def plot_comparison(runs, path, cfg):
    """pass@1 vs step (mean over seeds, band = min..max); eps and mean beta; teacher log-prob of rollouts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    beta_axis = axes[1].twinx()  # eps ~ 1e-2 and beta in [0, 1] need their own scales
    for i, (m, histories) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [row["step"] for row in histories[0] if "pass@1" in row]
        curves = torch.tensor([[row["pass@1"] for row in h if "pass@1" in row] for h in histories])  # (seeds, evals)
        axes[0].plot(steps, curves.mean(0), color=color, marker="o", label=m)
        axes[0].fill_between(steps, curves.min(0).values, curves.max(0).values, color=color, alpha=0.2)
        rows = [row for row in histories[0] if "loss" in row]
        train_steps = [r["step"] for r in rows]
        axes[1].plot(train_steps, [r["eps"] for r in rows], color=color, label=m)
        beta = torch.tensor([[r["beta"] for r in h if "loss" in r] for h in histories]).mean(0)  # (steps,)
        beta_axis.plot(train_steps, beta, color=color, linestyle="--")
        logprob = torch.tensor([[r["teacher_logprob"] for r in h if "loss" in r] for h in histories]).mean(0)
        axes[2].plot(train_steps, logprob, color=color, label=m)
    axes[0].set(xlabel="step", ylabel="held-out pass@1", title=f"pass@1 (mean over seeds {cfg.seeds}, band min-max)")
    axes[1].set(xlabel="step", ylabel="KL budget eps (solid)", title="KL budget (solid) and mean beta (dashed)")
    beta_axis.set(ylabel="mean beta over rollout tokens (dashed)", ylim=(-0.02, 1.02))
    axes[2].set(xlabel="step", ylabel="mean log pi_T(sampled token)", title="teacher log-prob of rollout tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    cfg = load_config(sys.argv[1:])
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep stderr to our own bars: teacher SFT, rollouts, distillation
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.compare:
        compare(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
