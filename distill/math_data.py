"""
The prompts of a run (the embedded task's or a real dataset's, formatted with the system prompt and chat template,
those over max_prompt_tokens dropped), real math datasets and answer checking. A dataset is a hub name, a
save_to_disk folder or a .json/.jsonl file, for training (a question field; OPD never reads an answer, so
prompt-only data such as OpenThoughts3 trains as is) and, optionally from another one, for evaluation (a question
and an answer field).
Answers are the last complete \\boxed{...} or "#### n" of a completion; on real data they are compared with
math-verify, the paper's checker (\\frac12 = 0.5 = \\dfrac{1}{2}), on the embedded synthetic task as exact strings.
"""
import codecs
import json
import os
import re
import threading

from distill import models, synthetic_task
from distill.config import die


def _load(name, config_name, key, streaming=False):
    """A DatasetDict from a hub name, a save_to_disk folder or a .json/.jsonl file (one split, named "train"); any
    loading problem stops with one line naming the key. A file is checked first (_check_json_file); a hub name is read
    from datasets' cache when an earlier load left it there (models.load_named); streaming: a hub name that is not
    there is streamed (an IterableDatasetDict), not downloaded whole."""
    import datasets
    datasets.disable_progress_bars()  # stderr stays clean: errors below must be one line

    def load(path, from_cache):
        if from_cache:
            return _from_cache(path, config_name)
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "dataset_info.json")):
            return datasets.load_from_disk(path)
        if os.path.isfile(path):
            return datasets.load_dataset("json", data_files=path)
        return datasets.load_dataset(path, config_name or None, streaming=streaming)

    if os.path.isfile(os.path.expanduser(name)):
        _check_json_file(os.path.expanduser(name), name, key)
    data = models.load_named(key, name, load, errors=Exception, dataset=True)  # any loader failure: one line
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    return datasets.DatasetDict({"train": data})


def _from_cache(name, config_name):
    """The hub dataset `name` from the Arrow files an earlier load left in datasets' cache, without a request to the
    hub (datasets' own offline mode, set for this call); OSError when it is not there."""
    import datasets
    from datasets.utils import logging
    offline, verbosity = datasets.config.HF_HUB_OFFLINE, logging.get_verbosity()
    datasets.config.HF_HUB_OFFLINE = True
    logging.set_verbosity_error()  # its warnings that it uses the cached copy: that is what was asked
    try:
        return datasets.load_dataset(name, config_name or None)
    except Exception as error:  # noqa: BLE001 - whatever the cache lacks, the hub may have
        raise OSError(f"{name} is not in datasets' cache: {models.first_line(error)}") from error
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
        logging.set_verbosity(verbosity)


def _check_json_file(path, name, key):
    """
    Stop with one line naming the file (and the line) when a dataset file has no rows, or a line or document that is
    not JSON: datasets' json loader says "StopIteration" or "An error occurred while generating the dataset" for these,
    the line number only in a log line above. Accepted as that loader accepts them: JSON lines (one object per line,
    blank lines skipped), or one JSON document, a list of rows or an object (of columns, or one row). JSON lines are
    read a line at a time; only a document is read whole, as the loader reads it.
    """
    first = next(_json_lines(path), None)
    if first is None:
        die(f"{key}: {name}: no rows")
    number, line = first
    document_like = line.lstrip().startswith(b"[")  # the loader reads a file that opens a list as one document
    if document_like or not _is_json(line):  # or a first line that is not JSON alone: one multi-line document?
        try:
            with open(path, encoding="utf-8-sig") as f:
                document = json.load(f)
        except UnicodeDecodeError:
            die(f"{key}: {name}: not UTF-8 text (a dataset file is .json or .jsonl)")
        except json.JSONDecodeError as error:
            where = error.lineno if document_like or not path.endswith(".jsonl") else number
            die(f"{key}: {name} line {where}: not valid JSON")
        if isinstance(document, list) and not document:
            die(f"{key}: {name}: no rows")
        if isinstance(document, (list, dict)):
            return
    for number, line in _json_lines(path):
        try:
            row = json.loads(line)
        except ValueError:  # UnicodeDecodeError included
            die(f"{key}: {name} line {number}: not valid JSON")
        if not isinstance(row, dict):
            die(f"{key}: {name} line {number}: not a JSON object")


def _json_lines(path):
    """(line number, bytes) of a file's non-blank lines, split at "\\n" only as the loader splits them; a leading
    UTF-8 byte order mark dropped."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.removeprefix(codecs.BOM_UTF8) if number == 1 else line
            if line.strip():
                yield number, line


def _is_json(line):
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _split(data, split, key, name):
    if split not in data:
        die(f"{key}: split {split!r} not in {name!r} (splits: {', '.join(data)})")
    return data[split]


def _fields(rows, fields, key, name):
    """The rows with just the named fields, renamed: fields maps a dataset field to "question" or "answer"."""
    for field in fields:
        if field not in rows.column_names:
            die(f"{key}: no field {field!r} in {name!r} (columns: {', '.join(rows.column_names)})")
    rows = rows.select_columns(list(fields))
    names = {k: v for k, v in fields.items() if k != v}
    return rows.rename_columns(names) if names else rows


def load_splits(cfg):
    """
    (train, held-out) datasets.Dataset: train with a "question" field only (training reads no answer), held-out with
    "question" and "answer". Held out: eval_size rows of eval_dataset's eval_split if eval_dataset is set, else of the
    training dataset's eval_split (a dataset with a single split gives eval_size of its rows, at most half, chosen with
    data_seed, and trains on the rest: it needs at least 2 rows).
    """
    data = _load(cfg.dataset, cfg.dataset_config, "dataset")
    if cfg.eval_dataset:
        train = _split(data, cfg.train_split, "train_split", cfg.dataset)
        held_out = _fields(
            _split(_load(cfg.eval_dataset, cfg.eval_dataset_config, "eval_dataset"), cfg.eval_split, "eval_split",
                   cfg.eval_dataset),
            {cfg.eval_question_field or cfg.question_field: "question", cfg.eval_answer_field or cfg.answer_field:
             "answer"}, "eval_dataset", cfg.eval_dataset)
    else:
        if cfg.eval_split not in data and len(data) == 1:  # a single split: hold out eval_size of its rows
            only = next(iter(data.values()))
            if len(only) < 2:
                die(f"dataset: too few rows to hold out eval_size of them: {cfg.dataset!r} has {len(only)} in its "
                    f"only split (at least 2: one to train on), or set eval_dataset")
            parts = only.train_test_split(test_size=min(cfg.eval_size, len(only) // 2), seed=cfg.data_seed)
            data = {cfg.train_split: parts["train"], cfg.eval_split: parts["test"]}
        train = _split(data, cfg.train_split, "train_split", cfg.dataset)
        held_out = _fields(_split(data, cfg.eval_split, "eval_split", cfg.dataset),
                           {cfg.question_field: "question", cfg.answer_field: "answer"}, "dataset", cfg.dataset)
    train = _fields(train, {cfg.question_field: "question"}, "dataset", cfg.dataset)
    return train, held_out.select(range(min(cfg.eval_size, len(held_out))))


def load_run_splits(cfg, tokenizer=None, verbose=True):
    """
    (train, held-out) datasets, the embedded task's or a real dataset's: "question" (and, held out, "answer") fields.
    Rows whose prompt (format_prompt, tokenized as encode_prompts does) is longer than max_prompt_tokens are dropped,
    with a printed count (verbose): one long prompt would widen every row of its decode call, past the memory plan.
    """
    train, held_out = synthetic_task.splits(cfg) if cfg.dataset == "synthetic" else load_splits(cfg)
    tokenizer = tokenizer or models.load_tokenizer(cfg)
    held_out_key = "eval_dataset" if cfg.eval_dataset else "dataset"
    return (drop_long_prompts(train, tokenizer, cfg, "dataset", "training", verbose),
            drop_long_prompts(held_out, tokenizer, cfg, held_out_key, "held-out", verbose))


def drop_long_prompts(rows, tokenizer, cfg, key, what, verbose):
    """The rows whose formatted prompt has at most max_prompt_tokens tokens; stops with one line if none has."""
    lengths = prompt_lengths(rows["question"], tokenizer, cfg)
    keep = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_tokens]
    if not keep:
        die(f"max_prompt_tokens: all {len(rows)} {what} prompts of {key} {getattr(cfg, key)!r} are longer than "
            f"{cfg.max_prompt_tokens} tokens (the shortest has {min(lengths, default=0)})")
    if len(keep) < len(rows):
        if verbose:
            print(f"{key}: dropped {len(rows) - len(keep)} of {len(rows)} {what} prompts over max_prompt_tokens="
                  f"{cfg.max_prompt_tokens} (the longest has {max(lengths)} tokens)")
        rows = rows.select(keep)
    return rows


def prompt_lengths(questions, tokenizer, cfg):
    """Each question's prompt length in tokens, formatted (format_prompt) and tokenized as encode_prompts does: what
    max_prompt_tokens bounds, here and in prepare_data.py."""
    return [len(ids) for ids in prompt_ids([format_prompt(q, tokenizer, cfg) for q in questions], tokenizer)]


def prompt_ids(prompts, tokenizer):
    """Each formatted prompt's token ids, unpadded, as encode_prompts tokenizes them."""
    return tokenizer(prompts, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def format_prompt(question, tokenizer, cfg):
    """Synthetic task: the question itself. Real data: the paper's system prompt, via the chat template if any (Qwen3's
    reads enable_thinking: off, it appends an empty think block)."""
    if cfg.dataset == "synthetic":
        return question
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=cfg.enable_thinking)
    return f"{cfg.system_prompt}\n\n{question}\n"


def encode_prompts(prompts, tokenizer, device):
    """Left-padded prompt batch: input_ids, attention_mask (B, P)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def final_answer(text):
    """
    The final answer of a solution as written: the content of the last complete \\boxed{...} (braces matched), else
    of the last '#### ...' line, else None. A last \\boxed{ left open (a completion cut at max_new_tokens) falls back
    to the complete one before it, as math-verify's own extraction, the paper's checker, reads such a text.
    """
    end = len(text)
    while (start := text.rfind("\\boxed{", 0, end)) >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j]
        end = start  # unclosed: look before it
    if "\\boxed{" in text:
        return None
    found = re.findall(r"####\s*([^\n]*)", text)
    return found[-1] if found else None


def normalize_answer(answer):
    return answer.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")


def extract_answer(text):
    """Final answer of a solution, normalised for exact comparison (None if it has none)."""
    found = final_answer(text)
    return normalize_answer(found) if found is not None else None


def reference_answer(answer):
    """Ground truth from a dataset answer: '#### n' or \\boxed{} when present, else the whole string; normalised."""
    extracted = extract_answer(answer)
    return extracted if extracted is not None else normalize_answer(answer)


def is_correct(completion, reference, exact):
    """
    Whether a completion's final answer (its last complete \\boxed{} or '#### n'; none means wrong) equals the dataset
    answer `reference` ('... #### n', a \\boxed{} solution, or the bare answer). exact: as normalised strings (the
    embedded task). Otherwise with math-verify, as the paper checks: both parsed as LaTeX and compared symbolically, so
    \\frac12, 0.5 and \\dfrac{1}{2} agree, and \\text{5} equals 5. Anything math-verify cannot parse counts as wrong.
    """
    if exact:
        return extract_answer(completion) == reference_answer(reference)
    predicted = final_answer(completion)
    if predicted is None or not predicted.strip():
        return False
    gold = final_answer(reference)
    gold = reference if gold is None else gold
    from math_verify import parse, verify
    # math-verify bounds its work with SIGALRM, which only the main thread may set: elsewhere, no time limit
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(parse(f"${gold}$", parsing_timeout=limit), parse(f"${predicted}$", parsing_timeout=limit),
                           timeout_seconds=limit))
    except Exception:  # noqa: BLE001 - a grader must never end an evaluation
        return False
