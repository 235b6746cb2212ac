"""
Decoding outside the loss, for train_small.py and train_fsdp.py: rollouts in calls of a bounded number of rows, the
held-out pass@1 of the student alone, and the greedy completions of the shown problems. Each takes the run's hooks
(train_small.SingleDevice or train_fsdp.FSDP) for what several processes must do together.
"""
import math
from contextlib import nullcontext
from dataclasses import fields
from types import SimpleNamespace

import torch
from tqdm import tqdm

import trb
from distill import fast, math_data, memory_plan, models, vllm_engine


def one_process(cfg, decoding=None):
    """The hooks evaluate and rollouts read, for one process with nothing to gather or reduce: what a caller without
    train_small.SingleDevice gets (the embedded task scores its teacher once, alone, before any run; evaluate.py)."""
    return SimpleNamespace(world=1, share=lambda n: slice(0, n), gathered=lambda *m: nullcontext(),
                           all_finished=lambda done: bool(done.all()), sum=list, decoding=decoding or fast.Decoding())


def rollouts(student, teacher, input_ids, attention_mask, rows_per_call, runtime, engine=None, **kwargs):
    """
    trb.blended_generate over (B, P) prompts, `rows_per_call` rows per call (0 = all at once; it bounds the two KV
    caches), with the parameters gathered once for all the calls; the parts are right-padded to the longest and joined.
    With a vllm_engine.Engine (which holds the student, and the teacher while the policy needs it), one engine call.
    """
    if engine is not None:
        return engine.rollouts(input_ids, attention_mask, **kwargs)
    rows_per_call = rows_per_call or input_ids.shape[0]
    with runtime.gathered(student, teacher):
        parts = [trb.blended_generate(student, teacher, input_ids[i:i + rows_per_call],
                                      attention_mask[i:i + rows_per_call], all_finished=runtime.all_finished,
                                      decoding=runtime.decoding, **kwargs)
                 for i in range(0, input_ids.shape[0], rows_per_call)]
    return cat_rollouts(parts, kwargs.get("pad_token_id"))


def rollout_stats(rollout):
    """Means over completion tokens of a trb.Rollout's diagnostics, as training logs them (docs/method.md section 7)."""
    m = rollout.completion_mask
    n = int(m.sum())

    def mean(x):
        return float(x[m].float().mean()) if n else math.nan

    return dict(beta=mean(rollout.beta), realised_kl=mean(rollout.realised_kl),
                teacher_logprob=mean(rollout.teacher_logprobs), teacher_entropy=mean(rollout.teacher_entropy),
                replaced_frac=mean(rollout.replaced), completion_tokens=n)


def cat_rollouts(parts, pad_token_id=None):
    """Rollouts of different rows as one trb.Rollout: each part's N columns right-padded to the longest part (with
    pad_token_id in sequences, zeros elsewhere), all outside completion_mask."""
    if len(parts) == 1:
        return parts[0]
    width = max(part.completion_mask.shape[1] for part in parts)

    def padded(part, name):
        value = (pad_token_id or 0) if name == "sequences" else 0
        return torch.nn.functional.pad(getattr(part, name), (0, width - part.completion_mask.shape[1]), value=value)

    return trb.Rollout(**{f.name: torch.cat([padded(part, f.name) for part in parts]) for f in fields(trb.Rollout)})


def _completions(model, tokenizer, questions, n, temperature, cfg, eos_ids, runtime, generator, engine):
    """n completions (text) of each formatted question, in order (problem-major), at `temperature` up to
    eval_max_new_tokens: eval_batch_size rows per blended_generate call, or all of them in one engine request."""
    if engine is not None:
        prompts = engine.unpadded(*math_data.encode_prompts(questions, tokenizer, "cpu"))
        ids, _ = engine.generate(prompts, eps=0.0, temperature=temperature, max_new_tokens=cfg.eval_max_new_tokens,
                                 n=n, seed=vllm_engine.request_seed(generator))
        return tokenizer.batch_decode([c for per_problem in ids for c in per_problem], skip_special_tokens=True)
    device = next(model.parameters()).device
    per_call = max(1, cfg.eval_batch_size // n)  # problems per call: n * per_call <= eval_batch_size rows
    texts = []
    for i in tqdm(range(0, len(questions), per_call), desc=f"eval rollouts (n={n})", leave=False):
        batch = math_data.encode_prompts(questions[i:i + per_call], tokenizer, device)
        input_ids, mask = (x.repeat_interleave(n, 0) for x in batch)  # (n * problems, P)
        with models.autocast(cfg):
            rollout = trb.blended_generate(model, None, input_ids, mask, eps=0.0,
                                           max_new_tokens=cfg.eval_max_new_tokens, temperature=temperature,
                                           eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                           generator=generator, vocab_size=len(tokenizer),
                                           all_finished=runtime.all_finished, decoding=runtime.decoding)
        texts += tokenizer.batch_decode(rollout.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
    return texts


@torch.no_grad()
def evaluate(model, tokenizer, held_out, cfg, seed, eos_ids=None, runtime=None, engine=None):
    """
    Held-out pass@1 = mean over problems of c/n (n = eval_samples at eval_temperature), and greedy accuracy, decoding
    eval_batch_size rows per call up to eval_max_new_tokens (or, with a vllm_engine.Engine holding the student, n
    samples per problem in one request). Answers are checked with math-verify on real data and by exact match on the
    embedded task. Under FSDP each rank decodes its share of the problems in lockstep with the others (the same
    number of calls, each stopping when every rank's rows are done; a rank with fewer problems pads its last call
    with uncounted ones), so no rank waits for another longer than stop_check_every tokens take; the counts are
    summed.
    """
    runtime = runtime or one_process(cfg)
    eos_ids = eos_ids or [tokenizer.eos_token_id]
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)  # evaluation's own RNG
    was_training = model.training
    model.eval()
    per_rank = -(-len(held_out) // runtime.world)  # every rank decodes as many problems as the largest share
    mine = list(range(len(held_out)))[runtime.share(len(held_out))]
    rows = [(i, True) for i in mine] + [(0, False)] * (per_rank - len(mine))  # (problem, counted)
    all_questions, answers = list(held_out["question"]), list(held_out["answer"])
    questions = [math_data.format_prompt(all_questions[i], tokenizer, cfg) for i, _ in rows]
    exact = cfg.dataset == "synthetic"
    correct = {}
    with runtime.gathered(model), memory_plan.moment("evaluation peak"):
        for name, n, temperature in (("pass@1", cfg.eval_samples, cfg.eval_temperature), ("greedy", 1, 0.0)):
            texts = _completions(model, tokenizer, questions, n, temperature, cfg, eos_ids, runtime, generator,
                                 engine)
            correct[name] = sum(counted and math_data.is_correct(text, answers[problem], exact)
                                for (problem, counted), text in zip((r for r in rows for _ in range(n)), texts))
    model.train(was_training)
    pass_correct, greedy_correct = runtime.sum([correct["pass@1"], correct["greedy"]])
    return {"pass@1": pass_correct / (cfg.eval_samples * len(held_out)), "greedy": greedy_correct / len(held_out)}


def score_alone(model, tokenizer, held_out, cfg):
    """The held-out scores of a model evaluated alone, before any run (the embedded task's teacher, once)."""
    return evaluate(model, tokenizer, held_out, cfg, seed=cfg.data_seed)


@torch.no_grad()
def sample_completions(model, tokenizer, held_out, cfg, eos_ids, runtime, engine=None):
    """
    Greedy completions of the first shown_problems held-out problems, the same ones at every evaluation so that a
    reader sees the text change: one dict per problem (problem index, question, prompt, reference answer, completion,
    correct). Every rank decodes all of them (FSDP: the same calls in lockstep); the main process writes them out.
    """
    problems = [held_out[i] for i in range(min(cfg.shown_problems, len(held_out)))]
    if not problems:
        return []
    prompts = [math_data.format_prompt(row["question"], tokenizer, cfg) for row in problems]
    input_ids, mask = math_data.encode_prompts(prompts, tokenizer, next(model.parameters()).device)  # (k, P)
    was_training = model.training
    model.eval()  # also keeps the KV cache on with activation checkpointing (a train-mode feature)
    with models.autocast(cfg), memory_plan.moment("evaluation peak"):
        rollout = rollouts(model, None, input_ids, mask, cfg.eval_batch_size, runtime, engine, eps=0.0,
                           temperature=0.0, max_new_tokens=cfg.eval_max_new_tokens, eos_token_id=eos_ids,
                           pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    model.train(was_training)
    texts = tokenizer.batch_decode(rollout.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
    return [{"problem": i, "question": row["question"], "prompt": prompt,
             "answer": math_data.reference_answer(row["answer"]), "completion": text,
             "correct": bool(math_data.is_correct(text, row["answer"], cfg.dataset == "synthetic"))}
            for i, (row, prompt, text) in enumerate(zip(problems, prompts, texts))]
