"""
The models of a run: the student and the teacher as Hugging Face causal LMs (a hub name or a local folder, or the
embedded task's, trained and cached on first use), their shared tokenizer, the compute dtype, the stop ids, and the
exported student. Used by train_small.py, train_fsdp.py, compare.py and the evaluation.
"""
import copy
import os

import torch

from distill import synthetic_task
from distill.config import die


def device_and_dtype(cfg):
    """The device, and the compute dtype of forward passes (autocast; the student's weights stay float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def load_pretrained(key, name, cfg, dtype):
    """A hub name or local folder as a causal LM; any loading failure is one line naming the key."""
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), dtype=dtype,
                                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        die(f"{key}: cannot load {name!r}: {str(error).splitlines()[0]}")


def load_tokenizer(cfg):
    """The student's tokenizer (the embedded task's character tokenizer), left-padded, checked against the teacher's."""
    if cfg.student == "synthetic":
        return synthetic_task.char_tokenizer()
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
        check_same_vocab(tokenizer, AutoTokenizer.from_pretrained(os.path.expanduser(cfg.teacher),
                                                                      trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError) as error:
        die(f"teacher: {str(error).splitlines()[0]}")
    return tokenizer


def load_models(cfg, train, held_out, tokenizer=None, score=None):
    """(tokenizer, student, teacher, teacher_scores). Teacher frozen: eval mode, no grad. The embedded task's teacher is
    scored once on the held-out split, score(model, tokenizer, held_out, cfg) (train_small.score_alone)."""
    device, dtype = device_and_dtype(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg)
    if cfg.student == "synthetic":
        teacher, teacher_scores = synthetic_task.teacher(cfg, tokenizer, train,
                                                         lambda model: score(model, tokenizer, held_out, cfg))
        student = synthetic_task.student(cfg, tokenizer, train)
    else:
        student = load_pretrained("student", cfg.student, cfg, torch.float32)
        teacher, teacher_scores = load_pretrained("teacher", cfg.teacher, cfg, dtype), None
    teacher.requires_grad_(False)
    if cfg.activation_checkpointing:  # per decoder layer; active in train mode only, i.e. in the loss forwards
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # float32 master weights for the student: AdamW steps of lr 1e-5 vanish in bf16 rounding; compute runs in `dtype`
    return (tokenizer, student.to(device, torch.float32), to_compute_dtype(teacher.to(device), dtype).eval(),
            teacher_scores)


def to_compute_dtype(model, dtype):
    """
    model with its parameters and buffers cast to dtype, except the rotary embeddings' buffers, which stay float32 as
    from_pretrained(dtype=...) leaves them. nn.Module.to(dtype) would round Qwen3's inv_freq to bf16 too: a relative
    frequency error up to 3.7e-3, i.e. a phase error of ~2.4 rad at position 2048, in every attention score.
    """
    rotary = [(module, name, buffer) for module in model.modules() if "Rotary" in type(module).__name__
              for name, buffer in module._buffers.items() if buffer is not None]
    model.to(dtype)
    for module, name, buffer in rotary:
        module._buffers[name] = buffer.to(torch.float32)  # the float32 values as they were, not rounded and back
    return model


def check_same_vocab(student_tokenizer, teacher_tokenizer):
    """Refuse tokenizers whose id -> token maps differ (naming the first difference); return the shared size."""
    s = {i: tok for tok, i in student_tokenizer.get_vocab().items()}
    t = {i: tok for tok, i in teacher_tokenizer.get_vocab().items()}
    for i in range(max(len(s), len(t))):
        if s.get(i) != t.get(i):
            raise ValueError(f"student and teacher tokenizers differ at id {i}: student {s.get(i)!r}, "
                             f"teacher {t.get(i)!r}; blending needs one shared vocabulary")
    return len(s)


def autocast(cfg):
    """Mixed precision for forwards and rollouts when the compute dtype is not float32 (bf16 on GPU by default)."""
    device, dtype = device_and_dtype(cfg)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def stop_token_ids(tokenizer, *models):
    """The student tokenizer's EOS first (the one emitted), then every other EOS id of the models (Qwen3-Base and
    chat models differ): trb merges them into one stop event (docs/method.md section 4)."""
    ids = []
    for model in models:
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        ids += eos if isinstance(eos, list) else [eos]
    return [tokenizer.eos_token_id] + sorted({i for i in ids if i is not None} - {tokenizer.eos_token_id})


def with_stop_ids(model, eos_ids, pad_token_id):
    """The model with generation_config.eos_token_id = all of eos_ids: training merged them into one stop event
    (a Base student's <|endoftext|> and a chat teacher's <|im_end|>), so the exported model must stop at each."""
    from transformers import GenerationConfig
    config = copy.deepcopy(model.generation_config) if model.generation_config is not None else GenerationConfig()
    config.eos_token_id, config.pad_token_id = list(eos_ids), pad_token_id
    model.generation_config = config
    return model
