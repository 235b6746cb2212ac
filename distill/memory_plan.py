"""
Memory per GPU of a training run, computed from the model configs (on the meta device: no weights, no GPU) for what
train_small.py (world size 1) and train_fsdp.py (world size > 1) hold at each moment of a step:

    python -m scripts.memory_plan --config=configs/qwen3_1.7b_from_8b.yaml --world_size=8 [--max_prompt_tokens=N]
    python -m scripts.memory_plan --measure --config=... [--key=value ...]   # also run it on CPU and measure

Moments: at rest (between steps), the rollout peak (both models decoding rollout_batch_size rows in lockstep), the
loss forward and the loss backward (one micro-batch's, with all its activations), the optimizer step and the
evaluation peak (the student decoding eval_batch_size rows). Prompts are max_prompt_tokens long (longer ones are
dropped when the data is loaded). Bytes are counted per term, for bf16 compute (the GPU default); the comments say
what each term is. Not modelled: the caching allocator's fragmentation (budget ~10%), the teacher's own greedy
completions of the shown_problems (a few rows at step 0), and torch.compile's and CUDA graphs' own buffers. `measure`
checks the plan against a real run on CPU (tests/test_memory_plan.py, README).
"""
import os
from contextlib import contextmanager

import torch

from distill import fast, models, synthetic_task
from distill.config import die, positive_int, script_options

GiB = 1024 ** 3
BF16, FP32 = 2, 4
CUDA_CONTEXT = 2 * GiB  # CUDA context, cuBLAS workspaces and NCCL buffers: a fixed allowance
# float32 (rows, V) buffers alive at once in one token of blended decoding: both models' logits, blend_logprobs' log
# pi_S, r, the blend and its fallback, and the draw's float64 cumulative sums (two buffers' worth)
TOKEN_RULE_BUFFERS = 12
STUDENT_RULE_BUFFERS = 7  # the same with the student alone (evaluation): its logits, log pi_S, the draw's float64 sums
SOLVER_BUFFERS = 5  # float32 (rows, V) buffers of trb.solve_beta, kept between tokens (fast.SolverBuffers)
# float32 (chunk, V) buffers of one chunk of chunked_opd_loss, forward or backward: student logits, pi_S, log-ratio,
# gradient (measured: 4 in each, with two EOS ids)
LOSS_CHUNK_BUFFERS = 4
# engine vllm: vllm_engine.visited_sums recomputes the rollout diagnostics per loss chunk: both models' logits, the
# solver's workspace, the blend and the teacher's log-probabilities (an estimate, not measured)
DIAGNOSTIC_BUFFERS = 2 + SOLVER_BUFFERS + 3
MOMENTS = ("at rest", "rollout peak", "loss forward", "loss backward", "optimizer step", "evaluation peak")
MOMENT = "memory moment: "  # the prefix of the profiler ranges that mark the moments in a run
# engine vllm with vllm_gpu_memory_utilization 0: the engine takes what the trainer leaves free while it decodes, less
# this fraction of the GPU, kept for what the plan does not count: the caching allocator's fragmentation, the engine's
# CUDA graphs and compile buffers (they stay while it sleeps) and vLLM's memory outside torch's allocator
ENGINE_MARGIN = 0.1


@contextmanager
def moment(name):
    """A torch.profiler range named after one of the MOMENTS, around the code of a run that makes it (train_small's
    training step, the evaluation); measure reads the peak inside. Looked up at each use, so gpu_check.py can put
    a CUDA measurement in its place."""
    with torch.profiler.record_function(MOMENT + name):
        yield

QWEN3 = {  # (hidden, intermediate, layers, heads, kv heads, tied embeddings): the published Qwen3 config.json values
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
        tokenizer = synthetic_task.char_tokenizer()
        layers, hidden = ((cfg.student_layers, cfg.student_hidden) if key == "student"
                          else (cfg.teacher_layers, cfg.teacher_hidden))
        return synthetic_task.tiny_qwen3(tokenizer, layers, hidden, seed=0).config, "embedded task"
    load = lambda path, local: AutoConfig.from_pretrained(path, local_files_only=local,
                                                         trust_remote_code=cfg.trust_remote_code)
    builtin = builtin_qwen3(name)
    if builtin is None:  # a local folder, or the hub cache; only then the hub (models.load_named)
        return models.load_named(key, name, load, "the config of "), "config.json"
    try:  # a built-in shape needs no network
        return load(os.path.expanduser(name), True), "config.json"
    except (OSError, ValueError):
        return builtin, "built-in Qwen3 shape"


class Shape:
    """What the plan needs of a model: exact parameter counts (meta device) and per-token sizes."""

    def __init__(self, config):
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self.params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
        self.largest_param = max(p.numel() for p in model.parameters())  # the embedding, for any vocabulary this size
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
        self.decoder_params = sum(layer_params)
        self.root_params = self.params - self.decoder_params  # embeddings, final norm, head: FSDP's root unit
        self.layer_params = max(layer_params)
        self.head_params = config.vocab_size * config.hidden_size
        c = config
        self.layers, self.hidden, self.intermediate, self.vocab = (c.num_hidden_layers, c.hidden_size,
                                                                   c.intermediate_size, c.vocab_size)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.q_width, self.kv_width = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        self.kv_per_token = c.num_hidden_layers * 2 * self.kv_width * BF16  # keys and values of every layer, bf16

    def activations_per_token(self, fp32_residual, masked, keys):
        """
        Bytes one decoder layer saves for backward per token (counted on CPU with saved_tensors_hooks): the two
        RMSNorms' float32 inputs and normalised outputs (16 H; with a float32 residual stream, i.e. a float32 student
        under autocast, both float32 and autocast's five bf16 casts of them for the projections: 26 H), the q and k
        norms' float32 inputs and bf16 q, k, v around them (10 q + 10 kv), the MLP's gate, up, activation and product
        (8 I). With an explicit mask (masked: rows of different lengths) SDPA keeps keys and values repeated to every
        query head (4 (q - kv) more) and its own bf16 copy of the mask, `keys` columns per token.
        """
        units = (26 if fp32_residual else 16) * self.hidden + 10 * self.q_width + 10 * self.kv_width
        return units + 8 * self.intermediate + masked * (4 * (self.q_width - self.kv_width) + BF16 * keys)

    def layer_transient(self, rows, queries, keys, masked):
        """
        Bytes of the largest transient of one decoder layer's forward, `queries` positions attending to `keys` (the
        cache's length, or the sequence itself), bf16: the MLP's gate, up and product (3 I), or, where attention gets
        an explicit mask and heads are grouped, keys and values repeated to every query head over all `keys` positions
        (transformers' sdpa_attention_forward calls repeat_kv unless use_gqa_in_sdpa allows enable_gqa, i.e. unless the
        mask is None; one query outside torch.compile is packed instead), plus the boolean mask and SDPA's bf16 copy.
        """
        mlp = rows * queries * 3 * self.intermediate * BF16
        repeated = 2 * rows * keys * self.q_width * BF16 if masked and self.q_width > self.kv_width else 0
        return max(mlp, repeated) + (rows * queries * keys * (1 + BF16) if masked else 0)  # SDPA casts it to bf16


def decode_transient(model, rows, padded, prompt, length, static, compiled):
    """One model's largest transient in a decode call: its prefill's layer_transient (a static cache's mask covers the
    whole cache, so it is explicit; a dynamic one's only with left padding, i.e. with several rows), or a compiled
    step's, which attends from one query to the whole static cache with an explicit mask (and is not packed)."""
    prefill = model.layer_transient(padded if compiled else rows, prompt, length if static else prompt,
                                    masked=static or rows > 1)
    step = model.layer_transient(padded, 1, length, masked=True) if compiled else 0
    return max(prefill, step)


def plan(cfg, world_size=1, gpu_gib=80, student=None, teacher=None):
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
    roll_rows, micro_rows = min(cfg.rollout_batch_size or rows, rows), min(cfg.micro_batch_size or rows, rows)
    eval_rows = max(cfg.eval_batch_size, cfg.eval_samples)  # evaluate: n x (eval_batch_size // n) rows, at least n
    static, compiled = cfg.cache == "static", cfg.compile
    pad = fast.padded_rows if compiled else (lambda r: r)  # compiled calls decode a power of two of rows
    P = cfg.max_prompt_tokens
    # positions per cache row
    length = (lambda n: fast.static_cache_length(P, n)) if static else (lambda n: P + n)
    L_roll, L_eval = length(cfg.max_new_tokens), length(cfg.eval_max_new_tokens)
    teacher_sharded = fsdp and cfg.teacher_sharding == "shard"
    Ns, Nt, V = student.params, teacher.params, student.vocab
    # compile: each model keeps its last static cache (fast.Decoding) through the loss and evaluation
    kept = {"student": max(pad(roll_rows) * L_roll, pad(eval_rows) * L_eval) * student.kv_per_token,
            "teacher": pad(roll_rows) * L_roll * teacher.kv_per_token} if compiled else {"student": 0, "teacher": 0}

    rest = {
        "student weights (fp32 master)": FP32 * Ns / shard,
        "AdamW state (2 x fp32)": 2 * FP32 * Ns / shard,
        "student gradients (fp32)": FP32 * Ns / shard,
        "student bf16 copy for decoding": 0 if fsdp else BF16 * Ns,
        "teacher weights (bf16)": BF16 * Nt / (shard if teacher_sharded else 1),
        "CUDA context, NCCL (allowance)": CUDA_CONTEXT,
        "solver workspace (fp32 rows x V, kept)": SOLVER_BUFFERS * pad(roll_rows) * V * FP32,
        "static KV caches kept (compile)": kept["student"] + kept["teacher"],
    }
    rollout = {
        "student gathered (bf16)": BF16 * Ns if fsdp else 0,
        "teacher gathered (bf16)": BF16 * Nt * (1 - 1 / shard) if teacher_sharded else 0,
        "KV caches (bf16)": 0 if compiled else roll_rows * L_roll * (student.kv_per_token + teacher.kv_per_token),
        # DynamicCache grows by torch.cat: one layer's old and new tensors coexist for a moment
        "KV cache growth (one layer copied)": 0 if static else roll_rows * L_roll * max(
            student.kv_per_token / student.layers, teacher.kv_per_token / teacher.layers),
        "token rule (fp32 rows x V)": TOKEN_RULE_BUFFERS * pad(roll_rows) * V * FP32,
        "prefill or step transient (one layer)": max(
            decode_transient(m, roll_rows, pad(roll_rows), P, L_roll, static, compiled) for m in (student, teacher)),
    }
    T = P + cfg.max_new_tokens  # a micro-batch's row at full width (trimming only helps)
    tokens = micro_rows * T
    masked = micro_rows > 1  # one row is trimmed to its own tokens: no padding, no mask, no repeat_kv
    final_norm = tokens * 8 * student.hidden  # the final RMSNorm's float32 input and output
    per_layer = student.activations_per_token(not fsdp, masked, T) * tokens
    if cfg.activation_checkpointing:  # each layer's input (and the boolean mask) kept; backward rebuilds one layer
        inputs = student.layers * tokens * student.hidden * (BF16 if fsdp else FP32) + masked * tokens * T + final_norm
        activations = {"loss forward": inputs, "loss backward": inputs + per_layer}
    else:
        activations = dict.fromkeys(("loss forward", "loss backward"), student.layers * per_layer + final_norm)
    completions = micro_rows * cfg.max_new_tokens  # the positions the loss reads
    chunk = min(fast.chunk_rows(cfg.loss_chunk_mib, V), completions)  # positions of one chunk of the chunked loss
    if cfg.chunked_loss:
        # the teacher's final hidden state (all positions: the loss's completion positions are a view of it), and
        # its completion rows gathered
        teacher_out = (tokens + completions) * teacher.hidden * BF16
        loss = (LOSS_CHUNK_BUFFERS * chunk * V * FP32 + completions * student.hidden * FP32  # the student's rows
                + completions * student.hidden * FP32  # their gradient, made in the forward (fast.FusedChunkedKL)
                + (chunk + fast.HEAD_BLOCK_ROWS) * max(student.hidden, teacher.hidden) * FP32)  # head blocks
        # the student head's gradient, summed over the chunks in the loss forward itself
        forward_head_gradient = V * student.hidden * (BF16 if fsdp else FP32)
        if teacher_sharded:
            loss += BF16 * V * teacher.hidden  # the gathered teacher head, copied for the loss's backward
        # the student head's gradient in its weight's dtype: the chunks' sum and the newest chunk's (a tied head's
        # waits for the embedding's, which then joins it), next to one chunk's buffers; the others are freed by then
        head_gradient = max(0, 2 * V * student.hidden * (BF16 if fsdp else FP32) + chunk * V * FP32 - loss)
    else:
        teacher_out = tokens * V * (BF16 + FP32)  # logits and their float32 log-softmax
        loss = tokens * V * (BF16 + 3 * FP32)  # student logits, float32 log-softmax, probabilities, gradient
        head_gradient = forward_head_gradient = 0  # inside the student's gradients: no chunks to sum
    both = {
        # FSDP: the root unit stays gathered, decoder layers gathered one (plus one prefetched) at a time; gradients
        # accumulate unsharded in fp32 until the last micro-batch's reduce-scatter
        "student gathered (bf16)": BF16 * (student.root_params + 2 * student.layer_params) if fsdp else 0,
        "unsharded fp32 gradients": FP32 * Ns if fsdp else 0,
        "forward transient (one layer)": max(m.layer_transient(micro_rows, T, T, masked) for m in (student, teacher)),
        "teacher output kept for the loss": teacher_out,
        "loss buffers": loss,
    }
    # one device: autocast casts the float32 student's linear layers to bf16 and caches the casts until the loss is
    # computed; the backward keeps those the graph saved: the decoder layers' unless checkpointed (the head's cast
    # dies with the one position of logits nothing reads)
    casts = 0 if fsdp else BF16 * (student.decoder_params + student.head_params)
    saved_casts = 0 if fsdp or cfg.activation_checkpointing else BF16 * student.decoder_params
    loss_forward = {**both, "activations (student)": activations["loss forward"],
                    "student weights cast by autocast (bf16)": casts,
                    "student head gradient, made in the loss forward": forward_head_gradient}
    loss_backward = {**both, "activations (student)": activations["loss backward"],
                     "student weights cast by autocast (bf16)": saved_casts,
                     "student head gradient beyond the loss buffers": head_gradient}
    # AdamW on a GPU (foreach): one float32 temporary the size of the parameters; one parameter at a time elsewhere,
    # two temporaries the size of the largest (the embedding)
    optimizer = {"AdamW step temporaries (fp32)": FP32 * max(Ns, 2 * student.largest_param) / shard,
                 # train_step still holds the last micro-batch's hidden states (or logits, and their EOS-merged copies)
                 "last micro-batch's outputs": tokens * (student.hidden * FP32 + teacher.hidden * BF16
                                                         if cfg.chunked_loss else V * (BF16 + BF16))}
    evaluation = {
        "student gathered (bf16)": BF16 * Ns if fsdp else 0,
        "KV cache (bf16)": 0 if compiled else eval_rows * L_eval * student.kv_per_token,
        "KV cache growth (one layer copied)": 0 if static else eval_rows * L_eval * student.kv_per_token
        / student.layers,
        "token rule (fp32 rows x V)": STUDENT_RULE_BUFFERS * pad(eval_rows) * V * FP32,
        "prefill or step transient (one layer)": decode_transient(student, eval_rows, pad(eval_rows), P, L_eval,
                                                                  static, compiled),
    }
    fraction, beside = cfg.vllm_gpu_memory_utilization, 0
    if cfg.engine == "vllm":  # the engine decodes: no decoding copy, caches or token rule of the HF loop
        rest.update({"student bf16 copy for decoding": 0, "solver workspace (fp32 rows x V, kept)": 0,
                     "static KV caches kept (compile)": 0})
        # the weight sync after each step runs beside the awake engine, one parameter at a time: the largest (the
        # embedding) gathered in fp32 under FSDP, and its bf16 copy (a tied one's kept until the head is sent)
        sync = student.largest_param * ((FP32 if fsdp else 0) + BF16)
        beside = sum(rest.values()) + sync  # the trainer's peak while the engine is awake
        if not fraction:  # what the GPU leaves beside it, less the margin, in hundredths
            fraction = max(0, int(100 * ((1 - ENGINE_MARGIN) * gpu_gib * GiB - beside) / (gpu_gib * GiB))) / 100
        # awake (rollouts, evaluation) it holds its fraction of the GPU: both models' bf16 weights (the student's
        # full copy on every rank), then its KV pool and CUDA graphs; asleep (the loss) it holds none of it
        weights = BF16 * (Ns + Nt)
        engine = {"vLLM engine: both models' weights (bf16)": weights,
                  "vLLM engine: KV pool, graphs (rest of its fraction)": max(0, fraction * gpu_gib * GiB - weights),
                  "weight sync: one parameter gathered": sync}
        rollout = evaluation = engine
        loss_forward["rollout diagnostics from the loss forward"] = (
            DIAGNOSTIC_BUFFERS * chunk * V * FP32)
    moments = dict(zip(MOMENTS, ({**rest, **extra} for extra in ({}, rollout, loss_forward, loss_backward, optimizer,
                                                                 evaluation))))
    engine_short = cfg.engine == "vllm" and BF16 * (Ns + Nt) >= fraction * gpu_gib * GiB
    return {"moments": moments, "totals": {m: sum(terms.values()) for m, terms in moments.items()},
            "engine_short": engine_short, "engine_fraction": fraction if cfg.engine == "vllm" else None,
            "engine_fraction_planned": not cfg.vllm_gpu_memory_utilization, "engine_beside": beside,
            "world_size": world_size, "gpu_gib": gpu_gib, "student_params": Ns, "teacher_params": Nt,
            "rows": {"rollout": roll_rows, "micro": micro_rows, "eval": eval_rows},
            "tokens": {"prompt": P, "rollout": L_roll, "eval": L_eval}}


def options(argv, **defaults):
    """({name: value} of the --world_size=N and --gpu_gib=N among argv, each a positive integer, else its default;
    the other arguments)."""
    given, rest = script_options(argv, dict.fromkeys(defaults))
    return {name: defaults[name] if raw is None else positive_int(f"--{name}", raw) for name, raw in given.items()}, rest


def report(cfg, world, gpu_gib):
    """Prints the plan of a run of cfg on `world` GPUs of gpu_gib each (the models, the rows and tokens, the table and
    the engine's fraction) and returns it."""
    if cfg.batch_size * cfg.rollouts_per_prompt % world:
        die(f"world_size: {world} does not divide the {cfg.batch_size * cfg.rollouts_per_prompt} rows of a step")
    sources = {key: model_config(getattr(cfg, key), cfg, key) for key in ("student", "teacher")}
    result = plan(cfg, world, gpu_gib, *(Shape(config) for config, _ in sources.values()))
    script = "train_fsdp.py" if world > 1 else "train_small.py"
    print(f"{script}, world size {world}: student {cfg.student} ({result['student_params'] / 1e9:.2f}B params, "
          f"{sources['student'][1]}), teacher {cfg.teacher} ({result['teacher_params'] / 1e9:.2f}B, "
          f"{sources['teacher'][1]})")
    tokens = result["tokens"]
    print(f"rows per rank: {result['rows']['rollout']} per decode call, {result['rows']['micro']} per loss "
          f"micro-batch, {result['rows']['eval']} per evaluation call; tokens per row: {tokens['prompt']} prompt "
          f"(max_prompt_tokens) + {cfg.max_new_tokens} new (evaluation: + {cfg.eval_max_new_tokens}); "
          f"{cfg.cache} KV caches of {tokens['rollout']} (evaluation: {tokens['eval']}) positions"
          + (", kept between calls (compile)" if cfg.compile else ""))
    print(format_plan(result))
    return result


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
    if result["engine_fraction"] is not None:
        lines.append(engine_line(result))
    if result["engine_short"]:
        lines.append("vllm_gpu_memory_utilization is too small: both models' weights fill the engine's fraction, "
                     "leaving no KV pool")
    return "\n".join(lines)


def engine_line(result):
    """engine vllm: the fraction of the GPU the engine takes, and where it comes from."""
    fraction, gpu = result["engine_fraction"], result["gpu_gib"]
    if not result["engine_fraction_planned"]:
        return f"vllm_gpu_memory_utilization: {fraction} of {gpu} GiB for the vLLM engine (set in the config)"
    return (f"vllm_gpu_memory_utilization: {fraction} of {gpu} GiB for the vLLM engine (0 in the config: what the GPU "
            f"leaves beside the trainer's {result['engine_beside'] / GiB:.1f} GiB while the engine is awake, less "
            f"{ENGINE_MARGIN:.0%} of it)")
