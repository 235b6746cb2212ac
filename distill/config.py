"""
The configuration that train_small.py and train_fsdp.py share. config.yaml holds every key's default; a --config file
is read on top of it and holds only the keys it changes (the presets in configs/ are such files). The Config dataclass
below holds every key once, with its type, its range check and the one-line meaning that config.yaml repeats as the
key's comment (tests/test_config.py checks that the two agree, key by key and in order).

    python train_small.py --help                  # every key with its type and meaning
    python train_small.py --config=my.yaml --lr=1e-5   # config.yaml, then my.yaml's keys, then --lr

A bad file, key or value stops the run with one line that names it (`die`), never a traceback: a key given twice in
one file, and an unknown key (with the nearest known one suggested), included.
"""
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

import trb

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "config.yaml"
PRESETS_DIR = DEFAULT_PATH.with_name("configs")  # real models: the paper's pairs, one GPU


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # report_to -> its package
REPORT_TO = ("none", *TRACKER_PACKAGES)


def missing_package(report_to):
    """The package report_to needs (tracking.py) if it is not installed, else None."""
    package = TRACKER_PACKAGES.get(report_to)
    return package if package and importlib.util.find_spec(package) is None else None


def die(message):
    """Stop with one line on stderr and exit code 2 (config and input errors: no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# Range checks: (predicate, what the error message asks for).
def at_least(low):
    return (lambda v: v >= low), f">= {low}"


def above(low):
    return (lambda v: v > low), f"> {low}"


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


POLICY = one_of(*trb.BEHAVIOR_POLICIES)
SEED_LIST = (lambda v: re.fullmatch(r"\d+(,\d+)*", v) is not None), "comma-separated integers"
FRACTION_OR_PLAN = (lambda v: 0 <= v <= 1), "in [0, 1] (0: from the memory plan)"
PROBABILITY_MOMENT = (lambda v: 0 <= v < 1), "in [0, 1)"
NON_EMPTY = (lambda v: v != ""), "a non-empty path"


def looks_local(name):
    """Whether a model or dataset argument names a local path rather than a hub name: it starts with ".", "/" or "~",
    or its first component is an existing folder (runs/small/student when runs/ exists)."""
    return name.startswith((".", "/", "~")) or os.path.isdir(name.split("/")[0] or "/")


def missing_local(name):
    """The one-line reason a model or dataset argument cannot be used, when it names a local path that does not exist
    (a misspelled folder would otherwise reach the hub and fail there with a message about repo ids); else None."""
    if name and looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        return f"no such folder or file: {name!r}"
    return None


def key(meaning, check=None):
    """A config key: its one-line meaning (config.yaml's comment for it) and its range check, if any."""
    return dataclasses.field(metadata={"meaning": meaning, "check": check})


@dataclass
class Config:
    # Behavior policy (trb.behavior) and its budget
    method: str = key("behavior policy for rollouts: opd, trb, fixed_eps, skd, temperature_warmup, teacher", POLICY)
    eps0: float = key("E5: initial per-token KL budget KL(mu || pi_S) (paper's 1.7B run: 0.02)", at_least(0))
    warmup_steps: int = key("E5: K, steps over which eps anneals linearly to 0 (also SKD / temperature warmup length)",
                            at_least(1))
    temperature: float = key("rollout sampling temperature (0 = greedy), paper: 1.0", at_least(0))
    skd_top_k: int = key("SKD: a student token outside the teacher's top-k is replaced (paper sweeps 15, 25, 50 of "
                         "151k tokens; the embedded task: 3 of its 18)", at_least(1))
    skd_temperature: float = key("SKD: temperature of the replacing teacher sample", above(0))
    tau0: float = key("temperature_warmup: start temperature, annealed to `temperature` over warmup_steps", above(0))
    # Distillation loop
    max_steps: int = key("optimisation steps (one update per batch of rollouts)", at_least(0))
    batch_size: int = key("prompts per step", at_least(1))
    rollouts_per_prompt: int = key("rollouts sampled per prompt (paper: 4)", at_least(1))
    max_new_tokens: int = key("completion length limit of training rollouts (paper: 7168)", at_least(1))
    stop_check_every: int = key("decoding asks whether every row (under FSDP: every rank's) is done every this many "
                                "tokens; each ask is a host sync and an all-reduce", at_least(1))
    cache: str = key("KV caches of rollouts and evaluation: dynamic (grown per token) or static (preallocated, needed "
                     "by compile)", one_of("dynamic", "static"))
    compile: bool = key("torch.compile both models' per-token forwards (CUDA graphs on a GPU; the token rule stays "
                        "eager); needs cache static")
    engine: str = key("decoder of rollouts and evaluation: hf (trb.blended_generate, the reference) or vllm "
                      "(vllm_engine.py, in the vLLM environment .venv-vllm)", one_of("hf", "vllm"))
    vllm_gpu_memory_utilization: float = key("engine vllm on a GPU: the fraction of its memory the engine takes for "
                                             "both models' weights and its KV pool; 0 = what the memory plan leaves "
                                             "beside the trainer, less a margin", FRACTION_OR_PLAN)
    vllm_cpu_kv_cache_gib: int = key("engine vllm on a CPU: GiB of its KV pool (VLLM_CPU_KVCACHE_SPACE)", at_least(1))
    rollout_batch_size: int = key("rows per blended_generate call (bounds the two KV caches); 0 = all rows of the "
                                  "step (of a rank, under FSDP)", at_least(0))
    micro_batch_size: int = key("rows per loss forward/backward (gradients accumulated); 0 = all rows of the step "
                                "(of a rank, under FSDP)", at_least(0))
    lr: float = key("AdamW peak lr (paper 1e-5 at 1.7B; picked for vanilla OPD here from {5e-4, 1e-3, 3e-3})",
                    above(0))
    lr_warmup_steps: int = key("cosine lr warmup, constant afterwards (paper: 15)", at_least(0))
    adam_beta1: float = key("AdamW beta1 (paper)", PROBABILITY_MOMENT)
    adam_beta2: float = key("AdamW beta2 (paper)", PROBABILITY_MOMENT)
    weight_decay: float = key("AdamW weight decay (paper)", at_least(0))
    grad_clip: float = key("gradient-norm clip (paper)", above(0))
    chunked_loss: bool = key("true: fast.chunked_opd_loss from hidden states (large vocabularies), false: trb.opd_loss")
    loss_chunk_mib: float = key("MiB of one chunk's float32 logits in chunked_opd_loss (at least one position a chunk)",
                                above(0))
    loss_topk: int = key("0 = exact full-vocabulary KL; k > 0 = the paper's student top-k estimate", at_least(0))
    activation_checkpointing: bool = key("recompute each decoder layer of the student in backward (less activation "
                                         "memory, ~1/3 more compute)")
    # Evaluation
    eval_every: int = key("evaluate every this many steps (also before training and at the end; 0 = only those)",
                          at_least(0))
    eval_size: int = key("held-out problems", at_least(1))
    eval_samples: int = key("n samples per problem for pass@1 = c/n", at_least(1))
    eval_temperature: float = key("sampling temperature of pass@1 (paper: 1.0); greedy accuracy is also reported",
                                  above(0))
    eval_batch_size: int = key("rows per evaluation decode call (bounds its KV cache; per rank under FSDP)",
                               at_least(1))
    eval_max_new_tokens: int = key("completion length limit of evaluation (paper: 8192)", at_least(1))
    eval_dataset: str = key("held-out dataset (hub name, folder or file); empty = the training dataset's eval_split")
    eval_dataset_config: str = key("configuration name of eval_dataset")
    eval_question_field: str = key("eval_dataset's problem field (empty = question_field)")
    eval_answer_field: str = key("eval_dataset's answer field (empty = answer_field)")
    shown_problems: int = key("the first n held-out problems, whose greedy completions are printed and logged to "
                              "samples.jsonl at every evaluation (0 = none)", at_least(0))
    # Run bookkeeping
    seed: int = key("student init, data order and rollout sampling", at_least(0))
    out_dir: str = key("one run's folder: metrics.jsonl, samples.jsonl, summary.json, run_config.yaml, checkpoints/, "
                       "student/ (comparison.* with compare)", NON_EMPTY)
    checkpoint_every: int = key("save a resumable checkpoint every this many steps (0 = never)", at_least(0))
    keep_checkpoints: int = key("the newest this many checkpoints are kept (a resume that cannot load one falls back "
                                "to the one before)", at_least(1))
    resume: bool = key("true: continue from the newest checkpoint in out_dir that loads (fresh if there is none and the run did not finish)")
    overwrite: bool = key("true: a fresh run deletes whatever an earlier run left in out_dir, as a whole (checkpoints, logs, student, evaluations)")
    report_to: str = key("metrics tracker of every metrics.jsonl row and the shown completions: none, tensorboard, "
                         "wandb or trackio (an optional package each: requirements-dev.txt)",
                         one_of(*REPORT_TO))
    compare: str = key("comma-separated arms, each a method with its own key=value overrides after colons (e.g. "
                       "opd,trb:eps0=0.3,trb:eps0=inf): train each for every seed and write comparison.{json,md,png}")
    seeds: str = key("seeds used by compare (paired: every method gets each seed's init, data and eval problems)",
                     SEED_LIST)
    compare_workers: int = key("compare runs in parallel, one process each (each uses num_threads threads)",
                               at_least(1))
    # Models and data ("synthetic" = the embedded offline task; otherwise hub names or local folders)
    student: str = key("student model")
    teacher: str = key("teacher model (must share the student's tokenizer)")
    dataset: str = key("dataset: hub name, save_to_disk folder or a .json/.jsonl file")
    dataset_config: str = key("dataset configuration name (e.g. \"main\" for openai/gsm8k)")
    train_split: str = key("split with the training prompts")
    eval_split: str = key("held-out split")
    question_field: str = key("dataset field with the problem")
    answer_field: str = key("dataset field with the answer (\"#### n\", \\boxed{n} or the bare answer); read for "
                            "held-out rows only, training needs none")
    max_prompt_tokens: int = key("prompts longer than this (in tokens, as formatted: system prompt, chat template) are "
                                 "dropped when the data is loaded, with a count; the memory plan's prompt length "
                                 "(paper: 1024)", at_least(1))
    system_prompt: str = key("real data only (paper)")
    enable_thinking: bool = key("Qwen3 chat template's thinking mode (on by default in the template, so in the paper's "
                                "verl runs); ignored without a chat template")
    num_threads: int = key("torch CPU threads (0 = torch default); >1 on a busy 2-core CPU can be ~10x slower",
                           at_least(0))
    dtype: str = key("auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16", one_of("auto", "float32", "bfloat16"))
    trust_remote_code: bool = key("passed to from_pretrained; only enable for models you trust")
    # Embedded synthetic task and its models (ignored for real models)
    cache_dir: str = key("trained teacher and per-seed student inits are cached here", NON_EMPTY)
    data_seed: int = key("generates the synthetic dataset and initialises the teacher", at_least(0))
    task_digits: int = key("operands have 1..task_digits digits", ((lambda v: 1 <= v <= 9), "in [1, 9]"))
    train_size: int = key("synthetic training problems", at_least(1))
    teacher_layers: int = key("teacher depth", at_least(1))
    teacher_hidden: int = key("teacher width", at_least(32))
    teacher_sft_steps: int = key("teacher SFT steps", at_least(0))
    teacher_sft_lr: float = key("teacher SFT peak lr (cosine decay)", above(0))
    student_layers: int = key("student depth", at_least(1))
    student_hidden: int = key("student width", at_least(32))
    student_sft_examples: int = key("distinct worked solutions the student sees before distillation", at_least(1))
    student_sft_steps: int = key("SFT steps of the student init (learns the format, not yet the arithmetic)",
                                 at_least(0))
    student_sft_lr: float = key("student SFT peak lr", above(0))
    sft_batch_size: int = key("SFT batch size (teacher and student init)", at_least(1))
    # train_fsdp.py only (train_small.py ignores them)
    teacher_sharding: str = key("replicate: a full teacher per GPU; shard: FSDP-sharded, gathered only while it runs",
                                one_of("replicate", "shard"))
    hsdp_shard_size: int = key("0 = shard over all ranks; n = HSDP: shard within groups of n ranks (a node), "
                               "replicate across groups", at_least(0))
    dist_timeout_minutes: float = key("timeout of every collective (NCCL's default, 10, is shorter than a checkpoint "
                                      "download or a slow evaluation)", above(0))


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line):
        super().__init__(f"line {line}: {key!r} is given twice")
        self.key, self.line = key, line


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (safe_load keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            name = self.construct_object(key_node, deep=deep)
            if name in seen:
                raise DuplicateKey(name, key_node.start_mark.line + 1)
            seen.add(name)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path):
    """The top-level mapping of a YAML file (yaml.safe_load's types); a missing, unreadable, malformed, empty or
    non-mapping file, or a key given twice, stops the run with one line naming the file (and the line)."""
    if not os.path.isfile(path):
        die(f"config: {str(path)!r} is not a file" if os.path.exists(path) else f"config: {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as error:
        die(f"config: cannot read {path}: {error.strerror}")
    except UnicodeDecodeError:
        die(f"config: {path} is not UTF-8 text")
    except DuplicateKey as error:
        die(f"config: {path}: line {error.line}: key {error.key!r} is given twice (one value per key)")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        die(f"config: {path}:{where} invalid YAML: {problem}")
    if values is None:
        die(f"config: {path} is empty (expected `key: value` lines)")
    if not isinstance(values, dict):
        die(f"config: {path} must be a mapping of `key: value` lines, not a YAML {type(values).__name__}")
    return values


def unknown_key(name, known, where):
    """The one-line error of an unknown key, with the nearest known key suggested (a typo is the usual cause)."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "--help lists every key"
    return f"{where}{name}: unknown config key ({hint})"


def parse_value(name, raw, kind):
    """A --key=value string as the key's type, or stop with a message naming the key."""
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        return kind(raw)
    except ValueError:
        die(f"{name}: expected {kind.__name__}, got {raw!r}")


def checked(name, value, where=None):
    """
    The value of key `name`, type- and range-checked. Accepted as floats: ints, and numeric strings (YAML 1.1 reads
    `1e-5` without a dot as a string). Floats must be finite, except eps0 (inf: the pure teacher). null is "".
    Errors name `where` (default: the key).
    """
    kind, check = FIELDS[name].type, FIELDS[name].metadata["check"]
    where = where or name
    if kind is float and type(value) is int:
        value = float(value)
    if kind is float and type(value) is str:
        value = parse_value(where, value, float)
    if value is None and kind is str:
        value = ""
    if type(value) is not kind:
        die(f"{where}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value) and not (name == "eps0" and value == math.inf):
        die(f"{where}: must be finite, got {value!r}")
    if check is not None and not check[0](value):
        die(f"{where}: must be {check[1]}, got {value!r}")
    return value


def arm_config(cfg, arm):
    """The config of one comparison arm, "method[:key=value...]": cfg with that method and those keys (each checked as
    on the command line); a bad method, key or value stops with one line naming compare."""
    method, *overrides = arm.split(":")
    if method not in trb.BEHAVIOR_POLICIES:
        die(f"compare: {arm!r}: {method!r} is not a behavior policy (one of {', '.join(trb.BEHAVIOR_POLICIES)})")
    values = {"method": method}
    for override in overrides:
        name, _, raw = override.partition("=")
        if name not in FIELDS or name in ("method", "seed", "compare", "seeds", "out_dir") or not raw:
            die(f"compare: {arm!r}: {override!r} is not key=value of a config key an arm may change")
        where = f"compare: {arm!r}: {name}"
        values[name] = checked(name, parse_value(where, raw, FIELDS[name].type), where)
    return dataclasses.replace(cfg, **values)


def arm_label(arm_cfg, arm):
    """How tables name an arm: "teacher warmup" for TRB at eps0 = inf (pure teacher rollouts for warmup_steps, then
    OPD), else the arm as given."""
    return "teacher warmup" if arm_cfg.method == "trb" and arm_cfg.eps0 == math.inf else arm


def usage():
    lines = ["usage: python train_small.py [--config=PATH] [--key=value ...]   (the same for train_fsdp.py)", ""]
    lines += [f"  --{name}={f.type.__name__:6s} {f.metadata['meaning']}" for name, f in FIELDS.items()]
    return "\n".join(lines)


def parse_flags(argv, flags, usage_line):
    """
    The --key=value arguments of a tool script (prepare_data.py, evaluate.py; the training scripts read a Config):
    `flags` maps each key to (type, default, meaning), default None for a required key. --help prints them; an
    argument of another form, an unknown key, a value of the wrong type or a missing required key stops with one line.
    """
    if any(arg in ("-h", "--help") for arg in argv):
        shown = lambda default: " (required)" if default is None else "" if default == "" else f" (default: {default})"
        width = max(len(f"--{name}={kind.__name__}") for name, (kind, _, _) in flags.items())
        lines = [usage_line, ""] + [f"  {f'--{name}={kind.__name__}':{width}s}  {meaning}{shown(default)}"
                                    for name, (kind, default, meaning) in flags.items()]
        print("\n".join(lines))
        sys.exit(0)
    values = {name: default for name, (_, default, _) in flags.items()}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            die(f"arguments must look like --key=value, got {arg!r}")
        name, raw = arg[2:].split("=", 1)
        if name not in flags:
            die(f"--{name}: unknown argument (--help lists them)")
        values[name] = parse_value(f"--{name}", raw, flags[name][0])
    for name, value in values.items():
        if value is None:
            die(f"--{name}: required (--help lists every argument)")
    return SimpleNamespace(**values)


def script_options(argv, defaults):
    """A script's own --name=value arguments, the names in defaults, apart from the others (config overrides for
    load_config): ({name: its raw value, else the default}, the other arguments in order)."""
    found, rest = dict(defaults), []
    for arg in argv:
        name, _, value = arg[2:].partition("=")
        if arg.startswith("--") and name in defaults:
            found[name] = value
        else:
            rest.append(arg)
    return found, rest


def positive_int(flag, raw):
    """raw as an integer >= 1; anything else stops with one line naming flag."""
    if not (raw.isdigit() and int(raw) >= 1):
        die(f"{flag}: expected a positive integer, got {raw!r}")
    return int(raw)


def load_config(argv):
    """
    config.yaml's defaults, then --config=PATH's keys on top of them (a file holds only what it changes), then the
    --key=value overrides; every value type- and range-checked. Real models with the embedded task's lr and length
    limit stop with a pointer to the presets.
    """
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        sys.exit(0)
    args = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            die(f"arguments must look like --key=value, got {arg!r}")
        name, raw = arg[2:].split("=", 1)
        if name != "config" and name not in FIELDS:
            die(unknown_key(name, FIELDS, "--"))
        args[name] = raw
    values = read_yaml(DEFAULT_PATH)
    path = args.pop("config", None)
    chosen = read_yaml(path) if path else {}
    for name in chosen:
        if name not in FIELDS:
            die(unknown_key(name, FIELDS, f"config: {path}: "))
    values.update(chosen)
    for name, f in FIELDS.items():
        if name in args:
            values[name] = parse_value(name, args[name], f.type)
        elif name not in values:
            die(f"{name}: missing from {DEFAULT_PATH}")
        values[name] = checked(name, values[name])
    cfg = Config(**values)
    for name in ("student", "teacher", "dataset", "eval_dataset"):
        if problem := missing_local(getattr(cfg, name)):
            die(f"{name}: {problem}")
    synthetic = [k for k in ("student", "teacher", "dataset") if getattr(cfg, k) == "synthetic"]
    if synthetic and len(synthetic) < 3:
        die(f"{synthetic[0]}: 'synthetic' needs student, teacher and dataset all 'synthetic'")
    if missing_package(cfg.report_to):  # before any model loads, not at the first logged row
        die(f"report_to: {cfg.report_to} needs the {missing_package(cfg.report_to)} package, which is not "
            f"installed (pip install -r requirements-dev.txt)")
    arms = cfg.compare.split(",") if cfg.compare else []
    if "" in arms or len(set(arms)) < len(arms):
        die(f"compare: {cfg.compare!r} has an empty arm or one named twice (comma-separated arms, e.g. opd,trb)")
    arm_methods = [arm_config(cfg, arm).method for arm in arms]  # each arm checked
    if cfg.engine == "vllm" and (cfg.method == "skd" or "skd" in arm_methods):
        die("engine: vllm runs the blend's token rule only; method skd (its teacher replaces tokens) needs engine: hf")
    if cfg.compile and cfg.cache != "static":
        die(f"compile: true needs cache: static, got cache: {cfg.cache}")
    embedded = [name for name in ("lr", "max_new_tokens") if name not in chosen and name not in args]
    if not synthetic and embedded:
        die(f"student: {cfg.student!r} is a real model, but {', '.join(embedded)} are {DEFAULT_PATH.name}'s values for "
            f"the embedded task; start from a preset, e.g. --config=configs/gsm8k_1gpu.yaml (presets in "
            f"{PRESETS_DIR.name}/)")
    return cfg
