"""
The training prompts of the paper's runs, from a dataset in OpenThoughts3's schema: each row holds `conversations`,
a list of {from: human | gpt, value} turns (the human turn is the prompt, the gpt turn a reasoning trace), and
`domain`, `source` and `difficulty`. On-policy distillation reads only the prompts, so the output is one .jsonl row
per prompt: `question` = the human turn, with the row's domain, source and difficulty; no answer.

    python -m scripts.prepare_data --source=open-thoughts/OpenThoughts3-1.2M --out=openthoughts3_25600.jsonl \\
        --n=25600 --seed=0 --tokenizer=Qwen/Qwen3-1.7B-Base --max_prompt_tokens=1024

In this order: rows of another domain are dropped (--domain; the paper does not say that it filtered, so by default
every domain stays), then rows without a human turn, then exact duplicate prompts (OpenThoughts3 holds several traces
of one question; the first row of each prompt stays). The remaining prompts are shuffled with --seed and taken in that
order without replacement until n are kept. With --tokenizer, a prompt longer than --max_prompt_tokens as training
formats it (system prompt and chat template, math_data.format_prompt) is skipped and counted, so training drops none
of the file. The same arguments give the same file, written atomically; the rows read, dropped and written are printed.
"""
import json
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

from distill import math_data, models
from distill.checkpoints import write_atomically
from distill.config import die, load_config, parse_flags

DEFAULTS = load_config([])  # config.yaml: the paper's system prompt and thinking mode, as the presets train with them
FLAGS = {
    "source": (str, None, "hub name, save_to_disk folder or .json/.jsonl file in OpenThoughts3's schema"),
    "out": (str, None, "the .jsonl file written"),
    "n": (int, None, "prompts written, drawn without replacement"),
    "seed": (int, 0, "the draw"),
    "split": (str, "train", "the source's split (a .json/.jsonl file is one split)"),
    "domain": (str, "", "keep this domain only, e.g. math (empty: all; the paper does not say that it filtered)"),
    "tokenizer": (str, "", "the student's tokenizer (hub name or folder): prompts over max_prompt_tokens are dropped"),
    "max_prompt_tokens": (int, 1024, "with --tokenizer: the longest prompt kept, in tokens as training formats it"),
    "system_prompt": (str, DEFAULTS.system_prompt, "the training config's system_prompt, for the prompt's length"),
    "enable_thinking": (bool, DEFAULTS.enable_thinking, "the training config's enable_thinking, for the length"),
    "trust_remote_code": (bool, False, "passed to the tokenizer's from_pretrained; only for tokenizers you trust"),
}
META = ("domain", "source", "difficulty")  # copied to the output when the source has them
LENGTH_BATCH = 512  # prompts tokenized at a time while walking the shuffled order


def read_rows(args):
    """The source's rows as dicts, read through math_data's loader: a folder or file as it is, a hub dataset from
    datasets' cache if an earlier load left it there, else streamed, one pass without an Arrow cache (OpenThoughts3-1.2M
    is a 28 GB download that its Arrow cache would double)."""
    data = math_data._load(args.source, "", "--source", streaming=True)
    if args.split not in data and len(data) == 1 and os.path.exists(os.path.expanduser(args.source)):
        args.split = next(iter(data))  # a file is one split, whatever its name
    rows = math_data._split(data, args.split, "--split", args.source)
    columns = rows.column_names
    if columns is None:  # a stream whose features the hub does not declare: every row is read whole
        return rows
    if "conversations" not in columns:
        die(f"--source: no field 'conversations' in {args.source!r} (columns: {', '.join(columns)}); expected "
            f"OpenThoughts3's schema")
    if args.domain and "domain" not in columns:
        die(f"--domain: {args.source!r} has no field 'domain' (columns: {', '.join(columns)})")
    return rows.select_columns(["conversations", *[k for k in META if k in columns]])


def human_turn(conversations):
    """The first human turn's text, or None."""
    return next((turn["value"] for turn in conversations or [] if turn.get("from") == "human"), None)


def unique_prompts(rows, domain):
    """(prompts, counts): one {question, meta...} per distinct human turn, in the source's order, and how many rows
    were read and dropped for each reason."""
    counts = {"read": 0, "other_domain": 0, "no_human_turn": 0, "duplicate": 0}
    seen, prompts = set(), []
    for row in rows:
        counts["read"] += 1
        if domain and row.get("domain") != domain:
            counts["other_domain"] += 1
            continue
        question = human_turn(row.get("conversations"))
        if question is None:
            counts["no_human_turn"] += 1
        elif question in seen:
            counts["duplicate"] += 1
        else:
            seen.add(question)
            prompts.append({"question": question, **{k: row[k] for k in META if k in row}})
    return prompts, counts


def draw(prompts, args, counts):
    """n of the prompts in the seeded shuffled order, those over max_prompt_tokens skipped (with a tokenizer)."""
    order = list(range(len(prompts)))
    random.Random(args.seed).shuffle(order)
    if not args.tokenizer:
        return [prompts[i] for i in order[:args.n]]
    tokenizer = models.pretrained_tokenizer("--tokenizer", args.tokenizer, args.trust_remote_code)
    fmt = SimpleNamespace(dataset=args.source, system_prompt=args.system_prompt, enable_thinking=args.enable_thinking)
    kept, counts["measured"], counts["too_long"], counts["longest"] = [], 0, 0, 0
    for start in range(0, len(order), LENGTH_BATCH):
        batch = [prompts[i] for i in order[start:start + LENGTH_BATCH]]
        for row, length in zip(batch, math_data.prompt_lengths([r["question"] for r in batch], tokenizer, fmt)):
            if len(kept) == args.n:
                return kept
            counts["measured"] += 1
            counts["longest"] = max(counts["longest"], length)
            if length > args.max_prompt_tokens:
                counts["too_long"] += 1
            else:
                kept.append(row)
    return kept


def dropped_line(counts, args):
    parts = [f"{counts['duplicate']:,} exact duplicate prompts", f"{counts['no_human_turn']:,} without a human turn"]
    if args.domain:
        parts.insert(0, f"{counts['other_domain']:,} of other domains (--domain={args.domain})")
    if args.tokenizer:
        parts.append(f"{counts['too_long']:,} over max_prompt_tokens={args.max_prompt_tokens} (of "
                     f"{counts['measured']:,} measured; the longest has {counts['longest']:,} tokens)")
    return "dropped: " + ", ".join(parts)


def main(argv=None):
    args = parse_flags(sys.argv[1:] if argv is None else argv, FLAGS,
                       "usage: python -m scripts.prepare_data --source=... --out=FILE.jsonl --n=ROWS [--seed=0] "
                       "[--key=value]")
    if args.n < 1:
        die(f"--n: must be >= 1, got {args.n}")
    prompts, counts = unique_prompts(read_rows(args), args.domain)
    kept = draw(prompts, args, counts)
    print(f"read {counts['read']:,} rows from {args.source} ({args.split})")
    print(dropped_line(counts, args))
    if len(kept) < args.n:
        die(f"--n: only {len(kept):,} prompts remain after dropping those above, fewer than the {args.n:,} asked for")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    print(f"wrote {len(kept):,} prompts to {args.out} (seed {args.seed}): a `question` field, no answer")


if __name__ == "__main__":
    main()
