"""
Memory per GPU of a training run, computed from the model configs (on the meta device: no weights, no GPU) for what
train_small.py (world size 1) and train_fsdp.py (world size > 1) hold at each moment of a step:

    python train_fsdp.py --plan --config=configs/qwen3_1.7b_from_8b.yaml --world_size=8 [--prompt_tokens=1024]
    python memory_plan.py --config=configs/gsm8k_1gpu.yaml                    # the same; world size 1

Moments: at rest (between steps), the rollout peak (both models decoding rollout_batch_size rows in lockstep), the
training peak (one micro-batch's loss forward and backward) and the evaluation peak (the student decoding
eval_batch_size rows). Bytes are counted per term; the comments say what each term is. Not modelled: the caching
allocator's fragmentation (budget ~10%), and activations of the teacher's forward (one layer at a time, no grad).
"""
import os
import sys

import torch

GiB = 1024 ** 3
BF16, FP32 = 2, 4
CUDA_CONTEXT = 2 * GiB  # CUDA context, cuBLAS workspaces and NCCL buffers: a fixed allowance
TOKEN_RULE_BUFFERS = 8  # float32 (rows, V) buffers alive in one token of blended decoding (logits, blend, solve)
LOSS_CHUNK_BUFFERS = 4  # float32 (chunk, V) buffers of chunked_opd_loss (student logits, pi_S, log-ratio, gradient)

QWEN3 = {  # (hidden, intermediate, layers, heads, kv heads, tied embeddings): ../shared/QWEN3_FACTS.md
    "0.6B": (1024, 3072, 28, 16, 8, True), "1.7B": (2048, 6144, 28, 16, 8, True),
    "4B": (2560, 9728, 36, 32, 8, True), "8B": (4096, 12288, 36, 32, 8, False)}


def builtin_qwen3(name):
    """Qwen3's published shapes for Qwen/Qwen3-<size>(-Base), or None."""
    size = name.removeprefix("Qwen/Qwen3-").removesuffix("-Base")
    if not name.startswith("Qwen/Qwen3-") or size not in QWEN3:
        return None
    from transformers import Qwen3Config
    hidden, intermediate, layers, heads, kv_heads, tied = QWEN3[size]
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=tied)


def model_config(name, cfg, key):
    """(config, where it came from) for a hub name or local folder; Qwen3's built-in shapes when offline."""
    from transformers import AutoConfig
    if name == "synthetic":
        import synthetic_task
        tokenizer = synthetic_task.char_tokenizer()
        layers, hidden = ((cfg.student_layers, cfg.student_hidden) if key == "student"
                          else (cfg.teacher_layers, cfg.teacher_hidden))
        return synthetic_task.tiny_qwen3(tokenizer, layers, hidden, seed=0).config, "embedded task"
    builtin = builtin_qwen3(name)
    try:  # local folder, or the hub cache; only then the network (a built-in shape needs neither)
        return AutoConfig.from_pretrained(os.path.expanduser(name), local_files_only=builtin is not None,
                                          trust_remote_code=cfg.trust_remote_code), "config.json"
    except (OSError, ValueError) as error:
        if builtin is None:
            from config import die
            die(f"{key}: cannot read the config of {name!r}: {str(error).splitlines()[0]}")
        return builtin, "built-in Qwen3 shape"


class Shape:
    """What the plan needs of a model: exact parameter counts (meta device) and per-token sizes."""

    def __init__(self, config):
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self.params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
        self.root_params = self.params - sum(layer_params)  # embeddings, final norm, head: FSDP's root unit
        self.layer_params = max(layer_params)
        c = config
        self.layers, self.hidden, self.intermediate, self.vocab = (c.num_hidden_layers, c.hidden_size,
                                                                   c.intermediate_size, c.vocab_size)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.q_width, self.kv_width = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        self.kv_per_token = c.num_hidden_layers * 2 * self.kv_width * BF16  # keys and values of every layer, bf16

    def activations_per_token(self):
        """Bytes one decoder layer saves for backward per token, bf16 unless noted: each RMSNorm its float32 input
        and bf16 output (2 x 3H), q/k/v projections (q + 2 kv), the q/k norms' float32 inputs (2 (q + kv)), rotated
        q and k (q + kv), attention output (q; SDPA keeps q, k, v, out and a per-row logsumexp), and the MLP's gate,
        up, activation and product (4 I)."""
        units = 6 * self.hidden + 5 * self.q_width + 5 * self.kv_width + 4 * self.intermediate
        return units * BF16


def plan(cfg, world_size=1, prompt_tokens=1024, gpu_gib=80, student=None, teacher=None):
    """
    Bytes per GPU, per moment and term: {"moments": {moment: {term: bytes}}, "totals": {moment: bytes}, ...}.
    world_size 1 is train_small.py (float32 student, a bf16 copy for decoding); > 1 is train_fsdp.py (student
    sharded over hsdp_shard_size ranks or all of them, bf16 mixed-precision parameters gathered to decode).
    """
    student = student or Shape(model_config(cfg.student, cfg, "student")[0])
    teacher = teacher or Shape(model_config(cfg.teacher, cfg, "teacher")[0])
    fsdp = world_size > 1
    shard = (cfg.hsdp_shard_size or world_size) if fsdp else 1  # ranks a parameter is split over
    rows = cfg.batch_size * cfg.rollouts_per_prompt // world_size  # this rank's rows per step
    roll_rows, micro_rows = cfg.rollout_batch_size or rows, cfg.micro_batch_size or rows
    eval_rows = cfg.eval_batch_size
    T_roll, T_eval = prompt_tokens + cfg.max_new_tokens, prompt_tokens + cfg.eval_max_new_tokens
    teacher_sharded = fsdp and cfg.teacher_sharding == "shard"
    Ns, Nt, V = student.params, teacher.params, student.vocab

    rest = {
        "student weights (fp32 master)": FP32 * Ns / shard,
        "AdamW state (2 x fp32)": 2 * FP32 * Ns / shard,
        "student gradients (fp32)": FP32 * Ns / shard,
        "student bf16 copy for decoding": 0 if fsdp else BF16 * Ns,
        "teacher weights (bf16)": BF16 * Nt / (shard if teacher_sharded else 1),
        "CUDA context, NCCL (allowance)": CUDA_CONTEXT,
    }
    kv_row = T_roll * (student.kv_per_token + teacher.kv_per_token)  # one row, both models, prompt + completion
    rollout = {
        "student gathered (bf16)": BF16 * Ns if fsdp else 0,
        "teacher gathered (bf16)": BF16 * Nt * (1 - 1 / shard) if teacher_sharded else 0,
        "KV caches (bf16)": roll_rows * kv_row,
        # DynamicCache grows by torch.cat: one layer's old and new tensors coexist for a moment
        "KV cache growth (one layer copied)": roll_rows * T_roll * max(student.kv_per_token / student.layers,
                                                                       teacher.kv_per_token / teacher.layers),
        "token rule (fp32 rows x V)": TOKEN_RULE_BUFFERS * roll_rows * V * FP32,
        # prefill: one layer's MLP intermediates over every prompt token, the widest model's
        "prefill transient (one layer)": roll_rows * prompt_tokens * 3 * max(student.intermediate,
                                                                             teacher.intermediate) * BF16,
    }
    tokens = micro_rows * T_roll  # a micro-batch at full width (trimming only helps)
    per_layer = student.activations_per_token() * tokens
    if cfg.activation_checkpointing:  # each layer's input kept, one layer's activations rebuilt at a time
        activations = student.layers * tokens * student.hidden * BF16 + per_layer
    else:
        activations = student.layers * per_layer
    if cfg.chunked_loss:
        teacher_out = tokens * teacher.hidden * BF16  # final hidden state only
        loss = (LOSS_CHUNK_BUFFERS * min(cfg.loss_chunk_size, tokens) * V * FP32
                + tokens * student.hidden * FP32)  # plus the student's gathered hidden states
        if teacher_sharded:
            loss += BF16 * V * teacher.hidden  # the gathered teacher head, copied for the loss's backward
    else:
        teacher_out = tokens * V * (BF16 + FP32)  # logits and their float32 log-softmax
        loss = tokens * V * (BF16 + 3 * FP32)  # student logits, float32 log-softmax, probabilities, gradient
    training = {
        # FSDP: the root unit stays gathered, decoder layers gathered one (plus one prefetched) at a time; gradients
        # accumulate unsharded in fp32 until the last micro-batch's reduce-scatter
        "student gathered (bf16)": BF16 * (student.root_params + 2 * student.layer_params) if fsdp else 0,
        "unsharded fp32 gradients": FP32 * Ns if fsdp else 0,
        "activations (student)": activations,
        "teacher output kept for the loss": teacher_out,
        "loss buffers": loss,
    }
    evaluation = {
        "student gathered (bf16)": BF16 * Ns if fsdp else 0,
        "KV cache (bf16)": eval_rows * T_eval * student.kv_per_token,
        "KV cache growth (one layer copied)": eval_rows * T_eval * student.kv_per_token / student.layers,
        "token rule (fp32 rows x V)": TOKEN_RULE_BUFFERS * eval_rows * V * FP32,
        "prefill transient (one layer)": eval_rows * prompt_tokens * 3 * student.intermediate * BF16,
    }
    moments = {"at rest": rest, "rollout peak": {**rest, **rollout}, "training peak": {**rest, **training},
               "evaluation peak": {**rest, **evaluation}}
    return {"moments": moments, "totals": {m: sum(terms.values()) for m, terms in moments.items()},
            "world_size": world_size, "gpu_gib": gpu_gib, "student_params": Ns, "teacher_params": Nt,
            "rows": {"rollout": roll_rows, "micro": micro_rows, "eval": eval_rows},
            "tokens": {"rollout": T_roll, "eval": T_eval}}


def format_plan(result, title=""):
    """A table in GiB: terms by moment, the totals and whether each fits gpu_gib."""
    moments = list(result["moments"])
    terms = list(dict.fromkeys(t for m in moments for t in result["moments"][m]))
    width = max(map(len, terms)) + 2
    lines = [title] if title else []
    lines.append(f"{'GiB per GPU':<{width}}" + "".join(f"{m:>17}" for m in moments))
    for term in terms:
        values = [result["moments"][m].get(term) for m in moments]
        if any(values):
            lines.append(f"{term:<{width}}" + "".join(f"{v / GiB:>17.1f}" if v is not None else f"{'':>17}"
                                                      for v in values))
    lines.append(f"{'total':<{width}}" + "".join(f"{result['totals'][m] / GiB:>17.1f}" for m in moments))
    fits = [m for m in moments if result["totals"][m] <= result["gpu_gib"] * GiB]
    verdict = "fits" if len(fits) == len(moments) else "does NOT fit at: " + ", ".join(
        m for m in moments if m not in fits)
    lines.append(f"{verdict} in {result['gpu_gib']} GiB per GPU (allocator fragmentation not modelled; keep ~10% free)")
    return "\n".join(lines)


def main(argv):
    """--plan [--world_size=N] [--prompt_tokens=N] [--gpu_gib=N] and the usual --config/--key=value arguments."""
    from config import die, load_config
    options = {"world_size": 1, "prompt_tokens": 1024, "gpu_gib": 80}
    rest = []
    for arg in argv:
        name, _, value = arg[2:].partition("=")
        if arg == "--plan":
            continue
        if arg.startswith("--") and name in options:
            if not value.isdigit() or int(value) < 1:
                die(f"{name}: expected a positive integer, got {value!r}")
            options[name] = int(value)
        else:
            rest.append(arg)
    cfg = load_config(rest)
    world = options["world_size"]
    if cfg.batch_size * cfg.rollouts_per_prompt % world:
        die(f"world_size: {world} does not divide the {cfg.batch_size * cfg.rollouts_per_prompt} rows of a step")
    sources = {key: model_config(getattr(cfg, key), cfg, key) for key in ("student", "teacher")}
    result = plan(cfg, world, options["prompt_tokens"], options["gpu_gib"],
                  *(Shape(config) for config, _ in sources.values()))
    script = "train_fsdp.py" if world > 1 else "train_small.py"
    print(f"{script}, world size {world}: student {cfg.student} ({result['student_params'] / 1e9:.2f}B params, "
          f"{sources['student'][1]}), teacher {cfg.teacher} ({result['teacher_params'] / 1e9:.2f}B, "
          f"{sources['teacher'][1]})")
    print(f"rows per rank: {result['rows']['rollout']} per decode call, {result['rows']['micro']} per loss "
          f"micro-batch, {result['rows']['eval']} per evaluation call; tokens per row: {options['prompt_tokens']} "
          f"prompt + {cfg.max_new_tokens} new (evaluation: + {cfg.eval_max_new_tokens})")
    print(format_plan(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
