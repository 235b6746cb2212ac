"""
The models of a run: the student and the teacher as Hugging Face causal LMs (a hub name or a local folder, or the
embedded task's, trained and cached on first use), their shared tokenizer, the compute dtype, the stop ids, and the
exported student. Used by train_small.py, train_fsdp.py, compare.py and the evaluation.
Models, tokenizers and datasets named by a hub name load through load_named: from the local Hugging Face cache first,
from the hub only when they are not there, and when the hub cannot serve them either (offline, or unreachable within a
few seconds) with one line that says so.
"""
import copy
import os
import threading
from urllib.parse import urlsplit

import torch

from distill import synthetic_task
from distill.config import die, missing_local

HUB_CHECK_S = 5  # how long hub_reachable waits for the hub's answer: name lookup, connection, TLS and one request
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # an offline variable set to one of these is on, as huggingface_hub reads it


def device_and_dtype(cfg):
    """The device, and the compute dtype of forward passes (autocast; the student's weights stay float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def first_line(error):
    """An error's first message line (its type's name if it has no message): what a one-line stop shows."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def offline_variable(dataset=False):
    """The environment variable that turns the Hugging Face libraries offline, or None: HF_HUB_OFFLINE, else
    TRANSFORMERS_OFFLINE, as huggingface_hub reads them; for datasets HF_DATASETS_OFFLINE decides when it is set."""
    names = ("HF_DATASETS_OFFLINE",) if dataset and "HF_DATASETS_OFFLINE" in os.environ else (
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    name = next((n for n in names if os.environ.get(n)), None)
    return name if name and os.environ[name].upper() in TRUE_VALUES else None


def hub_endpoint():
    """The hub's address: HF_ENDPOINT, else huggingface_hub's default (https://huggingface.co)."""
    from huggingface_hub import constants
    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or "https://huggingface.co"


def hub_reachable(timeout=HUB_CHECK_S):
    """Whether the hub answers one HEAD request within timeout seconds, any HTTP status counting as an answer. It goes
    through huggingface_hub's own HTTP client (its proxies, certificates and client factory, as a download would) but
    not through its retries; a TCP connection alone is no proof (an intercepting proxy accepts it and then fails
    TLS). It runs in a thread: a name lookup has no timeout of its own."""
    from huggingface_hub import get_session
    answered = []

    def ask():
        try:
            get_session().head(hub_endpoint(), timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001 - no answer, whatever the reason (lookup, connection, TLS, offline mode)
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def hub_unavailable(name, dataset=False):
    """Why the hub name `name`, not in the local Hugging Face cache, cannot be downloaded now (one line), or None: an
    offline variable is set, or the hub does not answer within HUB_CHECK_S. transformers and datasets retry an
    unreachable hub for 25-50 s before they fail, with a line per retry."""
    variable = offline_variable(dataset)
    if variable:
        return f"{name} is not in the local Hugging Face cache ({variable} is set)"
    if hub_reachable():
        return None
    fetch = f"hf download --repo-type dataset {name} --local-dir FOLDER" if dataset else f"hf download {name}"
    return (f"{name} is not in the local Hugging Face cache and {urlsplit(hub_endpoint()).netloc} cannot be "
            f"reached; download it where there is a network ({fetch}) or give a local folder")


def load_named(key, name, load, what="", errors=(OSError, ValueError), dataset=False):
    """
    load(path, local_files_only) for a model or dataset argument, a failure of the kinds in `errors` one line naming
    key. A local path is loaded as it is, and one that does not exist stops at once (a misspelled folder would reach
    the hub as a repo id). A hub name is loaded from the local Hugging Face cache first, without a request (load
    raises OSError when it is not there), and only then from the hub, unless hub_unavailable says why it cannot be.
    """
    if missing_local(name):
        die(f"{key}: cannot load {what}{name!r}: no such folder or file")
    path = os.path.expanduser(name)
    try:
        if os.path.exists(path):
            return load(path, False)
        try:
            return load(name, True)
        except OSError:
            reason = hub_unavailable(name, dataset)
            if reason:
                die(f"{key}: {reason}")
        return load(name, False)
    except errors as error:
        die(f"{key}: cannot load {what}{name!r}: {first_line(error)}")


def load_pretrained(key, name, cfg, dtype):
    """A hub name or local folder as a causal LM (load_named: the local cache first); any loading failure is one line
    naming the key."""
    from transformers import AutoModelForCausalLM
    return load_named(key, name, lambda path, local: AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, local_files_only=local))


def pretrained_tokenizer(key, name, trust_remote_code):
    """The tokenizer of a hub name or local folder (load_named: the local cache first), left-padded, pad = EOS if it
    has no pad token; any loading failure is one line naming the key."""
    from transformers import AutoTokenizer
    tokenizer = load_named(key, name, lambda path, local: AutoTokenizer.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=local), "a tokenizer from ")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg):
    """The student's tokenizer (the embedded task's character tokenizer), left-padded, checked against the teacher's."""
    if cfg.student == "synthetic":
        return synthetic_task.char_tokenizer()
    tokenizer = pretrained_tokenizer("student", cfg.student, cfg.trust_remote_code)
    try:
        check_same_vocab(tokenizer, pretrained_tokenizer("teacher", cfg.teacher, cfg.trust_remote_code))
    except ValueError as error:
        die(f"teacher: {first_line(error)}")
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
