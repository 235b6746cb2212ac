"""
Real math datasets for train_small.py and train_fsdp.py, and answer checking: a hub dataset, a save_to_disk folder or a
.json/.jsonl file with a question and an answer field; answers in "#### n" (GSM8K, and the embedded synthetic task) or
\\boxed{...} form, compared after light normalisation.
"""
import os
import re

from config import die


def load_splits(cfg):
    """(train, held-out) datasets.Dataset with "question" and "answer" fields from a hub name, a save_to_disk folder or
    a .json/.jsonl file; any loading problem stops with one line naming the key."""
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
