"""
Decoding outside the loss, for train_small.py and train_fsdp.py: the run's decoder, and what it decodes besides the
rollouts (the held-out pass@1 of the student alone, the greedy completions of the shown problems).

A decoder is built once per run: the Hugging Face loop (HFDecoder, trb.blended_generate) or the vLLM engine
(vllm_engine.Engine). Both answer the same calls:
    rollouts(input_ids, attention_mask, generator, **behavior) -> trb.Rollout    the step's rollouts (B, P) -> (B, N)
    completions(prompts, n, temperature, generator) -> per prompt, n token-id lists    the student alone
    sync(student)                 the updated student decodes from the next call on
    sleep(), wake_up()            the engine's GPU memory while the loss runs (nothing for the HF loop)
    has_teacher, drop_teacher()   whether the teacher still decodes; stop running it (the budget is 0 for good)
    close()                       free it
    rollout_diagnostics           whether a Rollout carries beta, KL and the teacher's view (the engine's does not)
"""
import copy
import math
from dataclasses import fields

import torch
from tqdm import tqdm

import trb
from distill import fast, math_data, memory_plan, models


class HFDecoder:
    """
    The Hugging Face loop, the reference: trb.blended_generate with the run's decoding options (fast.Decoding: static
    caches, the compiled step, kept for the whole run), in calls of a bounded number of rows, under autocast. `model`
    is the student (or a model evaluated alone), `teacher` None where no policy needs one. With a bf16 compute dtype
    and float32 master weights, it decodes a bf16 copy of the model (2 bytes per parameter), refreshed by sync: under
    autocast the float32 model itself would keep float32 keys in its KV cache (RMSNorm's float32 weight upcasts them),
    twice the memory. Models whose parameters reach the forward in the compute dtype already (FSDP's mixed precision:
    hooks.decodes_compute_dtype) decode as they are. hooks: the run's (gathered, all_finished).
    """
    has_teacher, rollout_diagnostics = False, True

    def __init__(self, cfg, model, teacher, hooks, eos_ids, pad_token_id, vocab_size):
        self.cfg, self.teacher, self.hooks = cfg, teacher, hooks
        self.eos_ids, self.pad_token_id, self.vocab_size = list(eos_ids), pad_token_id, vocab_size
        self.decoding = fast.Decoding(stop_check_every=cfg.stop_check_every, cache=cfg.cache, compile=cfg.compile)
        dtype = models.device_and_dtype(cfg)[1]
        self.model = model
        self.device = next(model.parameters()).device
        if dtype != torch.float32 and model.dtype != dtype and not hooks.decodes_compute_dtype:
            self.model = models.to_compute_dtype(copy.deepcopy(model), dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def sync(self, student):
        """The copy's weights from the master's (nothing to do where the model decodes as it is)."""
        if self.model is not student:
            for target, source in zip(self.model.parameters(), student.parameters()):
                target.copy_(source)

    def _generate(self, teacher, input_ids, attention_mask, rows_per_call, **kwargs):
        """trb.blended_generate over (B, P) prompts, rows_per_call rows per call (0: all; it bounds the two KV caches),
        the parameters gathered once for all the calls; the parts right-padded to the longest and joined."""
        rows_per_call = rows_per_call or input_ids.shape[0]
        was_training = self.model.training
        self.model.eval()  # also keeps the KV cache on with activation checkpointing (a train-mode feature)
        with self.hooks.gathered(self.model, teacher), models.autocast(self.cfg):
            parts = [trb.blended_generate(self.model, teacher, input_ids[i:i + rows_per_call],
                                          attention_mask[i:i + rows_per_call], eos_token_id=self.eos_ids,
                                          pad_token_id=self.pad_token_id, vocab_size=self.vocab_size,
                                          all_finished=self.hooks.all_finished, decoding=self.decoding, **kwargs)
                     for i in range(0, input_ids.shape[0], rows_per_call)]
        self.model.train(was_training)
        return cat_rollouts(parts, self.pad_token_id)

    def rollouts(self, input_ids, attention_mask, generator=None, max_new_tokens=None, **behavior):
        """The behavior policy's rollouts (trb.behavior's keyword arguments), rollout_batch_size rows per call, up to
        max_new_tokens (default: the config's); the teacher decodes in lockstep only where the policy needs it."""
        teacher = self.teacher if trb.behavior_needs_teacher(behavior) else None
        return self._generate(teacher, input_ids, attention_mask, self.cfg.rollout_batch_size, generator=generator,
                              max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, **behavior)

    def completions(self, prompts, n, temperature, generator=None):
        """n completions of each token-id prompt (each up to and including its EOS), up to eval_max_new_tokens: the
        problems left-padded eval_batch_size // n at a time, their n samples side by side in one call."""
        per_call = max(1, self.cfg.eval_batch_size // n)
        out = []
        for i in tqdm(range(0, len(prompts), per_call), desc=f"eval rollouts (n={n})", leave=False):
            input_ids, mask = (x.repeat_interleave(n, 0) for x in left_padded(prompts[i:i + per_call],
                                                                               self.pad_token_id, self.device))
            rollout = self._generate(None, input_ids, mask, 0, eps=0.0, temperature=temperature,
                                     max_new_tokens=self.cfg.eval_max_new_tokens, generator=generator)
            rows = [row[keep].tolist() for row, keep in zip(rollout.sequences[:, input_ids.shape[1]:],
                                                            rollout.completion_mask)]
            out += [rows[j:j + n] for j in range(0, len(rows), n)]
        return out

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def drop_teacher(self):
        pass

    def close(self):
        pass


def left_padded(prompts, pad_token_id, device):
    """Token-id lists as a left-padded batch: input_ids, attention_mask (B, P), as the tokenizer pads them."""
    P = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return input_ids.to(device), mask.to(device)


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


@torch.no_grad()
def evaluate(decoder, tokenizer, held_out, cfg, seed, hooks, scorer=None):
    """
    Held-out pass@1 = mean over problems of c/n (n = eval_samples at eval_temperature), and greedy accuracy, of the
    decoder's student alone. Answers are checked with math-verify on real data and by exact match on the embedded task.
    scorer(prompts, references, samples) -> {name: (sum, count)}: more endpoints from the same pass@1 samples (each
    rank's rows, uncounted ones with the reference None), each summed over ranks and returned as sum / count.
    Under FSDP each rank decodes its share of the problems in lockstep with the others (the same number of calls,
    each stopping when every rank's rows are done; a rank with fewer problems pads its last call with uncounted ones),
    so no rank waits for another longer than stop_check_every tokens take; the counts are summed (hooks.sum).
    """
    generator = torch.Generator(decoder.device).manual_seed(seed)  # evaluation's own RNG
    per_rank = -(-len(held_out) // hooks.world)  # every rank decodes as many problems as the largest share
    mine = list(range(len(held_out)))[hooks.share(len(held_out))]
    rows = [(i, True) for i in mine] + [(0, False)] * (per_rank - len(mine))  # (problem, counted)
    all_questions, answers = list(held_out["question"]), list(held_out["answer"])
    prompts = math_data.prompt_ids([math_data.format_prompt(all_questions[i], tokenizer, cfg) for i, _ in rows],
                                   tokenizer)
    exact = cfg.dataset == "synthetic"
    correct, scored = {}, {}
    with memory_plan.moment("evaluation peak"):
        for name, n, temperature in (("pass@1", cfg.eval_samples, cfg.eval_temperature), ("greedy", 1, 0.0)):
            samples = decoder.completions(prompts, n, temperature, generator)
            correct[name] = sum(counted and math_data.is_correct(text, answers[problem], exact)
                                for (problem, counted), per_problem in zip(rows, samples)
                                for text in tokenizer.batch_decode(per_problem, skip_special_tokens=True))
            if name == "pass@1" and scorer is not None:
                scored = scorer(prompts, [answers[problem] if counted else None for problem, counted in rows], samples)
    pass_correct, greedy_correct, *sums = hooks.sum([correct["pass@1"], correct["greedy"],
                                                    *(x for pair in scored.values() for x in pair)])
    more = {name: total / count if count else math.nan for name, total, count in zip(scored, sums[::2], sums[1::2])}
    return {"pass@1": pass_correct / (cfg.eval_samples * len(held_out)), "greedy": greedy_correct / len(held_out),
            **more}


@torch.no_grad()
def sample_completions(decoder, tokenizer, held_out, cfg):
    """
    Greedy completions of the first shown_problems held-out problems, the same ones at every evaluation so that a
    reader sees the text change: one dict per problem (problem index, question, prompt, reference answer, completion,
    correct). Every rank decodes all of them (FSDP: the same calls in lockstep); the main process writes them out.
    """
    problems = [held_out[i] for i in range(min(cfg.shown_problems, len(held_out)))]
    if not problems:
        return []
    prompts = [math_data.format_prompt(row["question"], tokenizer, cfg) for row in problems]
    with memory_plan.moment("evaluation peak"):
        samples = decoder.completions(math_data.prompt_ids(prompts, tokenizer), 1, 0.0)
    texts = [tokenizer.decode(per_problem[0], skip_special_tokens=True) for per_problem in samples]
    return [{"problem": i, "question": row["question"], "prompt": prompt,
             "answer": math_data.reference_answer(row["answer"]), "completion": text,
             "correct": bool(math_data.is_correct(text, row["answer"], cfg.dataset == "synthetic"))}
            for i, (row, prompt, text) in enumerate(zip(problems, prompts, texts))]
