"""
Trust-Region Behavior Blending (TRB) for on-policy distillation.
Paper: Plyusov et al., "Trust-Region Behavior Blending for On-Policy Distillation", arXiv 2605.31159 (2026).

On-policy distillation (OPD) trains a student pi_S on prefixes it samples itself, with a per-prefix reverse KL to
a frozen teacher pi_T (E1). Early student rollouts are poor, so TRB samples warmup rollouts from the most
teacher-like distribution inside a KL trust region around the student (E2). That distribution is a geometric blend
of the two models (E3) whose strength beta is solved per token (E4). The budget eps anneals to zero (E5), after
which training is plain OPD. TRB changes only which prefixes are visited; the loss is always E1.

The labels E1-E5 are this project's, defined in docs/method.md with the rest of the method. Read top-down: the
schedule, the blend, the solve, the losses, the lockstep sampler, the behavior policies. The fast paths (the
solver's Halley iteration, static caches and the compiled decode step, the chunked loss) live in trb_fast.py, each
tested against the plain version here.

Shapes: B batch, T time (sequence positions), P prompt length, N new tokens, V vocabulary, H hidden size.

    equation                                              function
    E1  L = E_h[ KL(pi_S(.|h) || pi_T(.|h)) ]             reverse_kl, opd_loss, chunked_opd_loss
    E2  mu* = argmin KL(mu||pi_T) s.t. KL(mu||pi_S)<=eps  blended_generate (solve E4, then sample E3)
    E3  mu_beta ~ pi_S^(1-beta) * pi_T^beta               blend_logprobs
    E4  beta* = max{beta in [0,1]: KL(mu_beta||pi_S)<=eps} solve_beta_bisect (as stated), solve_beta (fast)
    E5  eps_k = eps_0 * (1 - k/K) for k < K, else 0       kl_budget
"""
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

import trb_fast
from trb_fast import Decoding  # blended_generate's options: stop check, cache kind, compile

# -----------------------------------------------------------------------------
# The maths: budget schedule, blend, blend solve, losses. Tensors in, tensors out.


def kl_budget(step, eps0, warmup_steps):
    """E5: eps_k = eps0 * (1 - k / K) for k < K, exactly 0.0 from k = K on; K = None keeps eps0 (fixed-eps)."""
    if eps0 < 0:
        raise ValueError(f"eps0 must be >= 0, got {eps0}")
    if warmup_steps is None:
        return float(eps0)
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be a positive int or None, got {warmup_steps}")
    return float(eps0) * (1.0 - step / warmup_steps) if step < warmup_steps else 0.0


def _blend_terms(student_logits, teacher_logits):
    """
    The pieces of E3 with the zero-probability rules of docs/method.md section 2 made explicit.
    Returns log_ps (..., V) = log pi_S restricted to the joint support M (-inf off M), and r (..., V) =
    log pi_T - log pi_S (0 off M). Off M a token has weight 0 for every beta > 0: either the student gives it
    probability 0 (never feasible) or the teacher does (weight pi_T^beta = 0).
    """
    dtype = trb_fast.compute_dtype(student_logits)
    log_ps = torch.log_softmax(student_logits.to(dtype), dim=-1)  # (..., V)
    # Normalise both first: raw t - s loses digits when logits are in the thousands.
    r = torch.log_softmax(teacher_logits.to(dtype), dim=-1).sub_(log_ps)  # (..., V)
    joint = torch.isfinite(r)  # (..., V) false where either model has probability 0
    return log_ps.masked_fill(~joint, -math.inf), r.masked_fill_(~joint, 0.0)


def blend_logprobs(student_logits, teacher_logits, beta):
    """
    E3: log mu_beta = log pi_S + beta * r - A(beta), normalised, shape (..., V); beta (...) or a float.
    Zero-probability rules: student zeros stay zero for every beta; teacher zeros get zero for beta > 0.
    Where the two supports are disjoint no blend exists and log pi_S is returned. Never NaN.
    """
    log_ps, r = _blend_terms(student_logits, teacher_logits)
    beta = torch.as_tensor(beta, dtype=log_ps.dtype, device=log_ps.device).expand(log_ps.shape[:-1])
    w = torch.addcmul(log_ps, beta.unsqueeze(-1), r)  # (..., V) on the joint support
    log_mu = torch.log_softmax(w, dim=-1)  # (..., V)
    # beta = 0 is pi_S itself (its support includes teacher zeros); so is a row with no joint support. Those rows are
    # log_softmax(student) as computed here, not normalised a second time: equal to pi_S by construction, on any CPU.
    fallback = (beta == 0) | ~torch.isfinite(w.amax(dim=-1))  # (...)
    pure_student = torch.log_softmax(student_logits.to(log_ps.dtype), dim=-1)  # (..., V)
    return torch.where(fallback.unsqueeze(-1), pure_student, log_mu)


@torch.no_grad()
def solve_beta_bisect(student_logits, teacher_logits, eps, iters=50):
    """
    E4 as the paper states it: beta* = max { beta in [0, 1] : KL(mu_beta || pi_S) <= eps }, found by bisection,
    since KL(mu_beta || pi_S) grows monotonically in beta. Each iteration builds the blend and its KL; after `iters`
    of them beta* is bracketed to 2^-iters. Short and slow: solve_beta is the fast solver, and the tests check it
    against this one run in float64. Same conventions as solve_beta (eps a float or a tensor of the batch shape;
    disjoint supports give 0).
    """
    log_ps, r = _blend_terms(student_logits, teacher_logits)  # (..., V) on the joint support of the two models
    eps = torch.as_tensor(eps, dtype=log_ps.dtype, device=log_ps.device).expand(log_ps.shape[:-1])

    def realised_kl(beta):  # KL(mu_beta || pi_S) for beta > 0, where mu_beta lives on the joint support (E3)
        log_mu = torch.log_softmax(log_ps + beta.unsqueeze(-1) * r, dim=-1)  # (..., V)
        return _kl(log_mu, log_ps)  # NaN where the supports are disjoint (no blend): never <= eps, so infeasible

    lo, hi = torch.zeros_like(eps), torch.ones_like(eps)  # KL(lo) <= eps < KL(hi), unless beta* = 1
    for _ in range(iters):
        mid = (lo + hi) / 2
        feasible = realised_kl(mid) <= eps
        lo, hi = torch.where(feasible, mid, lo), torch.where(feasible, hi, mid)
    beta = torch.where(realised_kl(torch.ones_like(eps)) <= eps, 1.0, lo)
    return torch.where(eps == 0, 0.0, beta)  # eps = 0 is pi_S itself, even where the models agree


def solve_beta(student_logits, teacher_logits, eps, tol=1e-4, max_iter=50):
    """
    E4, fast: the beta* of solve_beta_bisect (tested against it, run in float64, on every kind of logits), for about
    one evaluation of the blend instead of 50. Halley steps on sqrt(KL(mu_beta || pi_S)) - sqrt(eps) from the
    small-budget guess sqrt(2 eps / Var_{pi_S}[r]), inside a bracket (docs/method.md section 2): trb_fast.solve_beta.
    eps: float >= 0 (inf allowed) or a tensor broadcastable to the batch shape (...). Returns beta* (...) in float32
    (float64 for float64 logits); rows whose supports are disjoint get 0. A row stops within `tol` (relative) of eps.
    """
    return trb_fast.solve_beta(student_logits, teacher_logits, eps, tol=tol, max_iter=max_iter)


def reverse_kl(student_logits, teacher_logits):
    """
    E1 per position: KL(pi_S || pi_T) = sum_a pi_S(a) (log pi_S(a) - log pi_T(a)), shape (...). Computed in at
    least float32. Tokens the student gives probability 0 contribute 0 (also to the gradient); a token the teacher
    gives probability 0 but the student does not makes the KL +inf, as it is.
    """
    dtype = trb_fast.compute_dtype(student_logits)
    log_ps = torch.log_softmax(student_logits.to(dtype), dim=-1)  # (..., V)
    return _kl(log_ps, torch.log_softmax(teacher_logits.to(dtype), dim=-1))


def _kl(log_p, log_q):
    """KL(p || q) over the last dim of log-probabilities, with 0 log 0 = 0 (also in the gradient)."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim=-1)  # masked before the product: no 0 * inf


def _topk_reverse_kl(student_logits, teacher_logits, topk):
    """
    E1 per position, exact for topk = 0 (or >= V); else the paper's top-k estimate (docs/method.md section 1): with
    S_k the k tokens of highest student logit (selected without gradient) and q = pi_S renormalised on S_k,
        KL(q || pi_T) = sum_{a in S_k} q(a) (log q(a) - log pi_T(a)),   log pi_T over the full vocabulary.
    A true KL (>= 0), with the gradient of the variant that also renormalises the teacher on S_k (they differ by
    -log pi_T(S_k), constant in the student).
    """
    dtype = trb_fast.compute_dtype(student_logits)
    if topk == 0 or topk >= student_logits.shape[-1]:
        return reverse_kl(student_logits, teacher_logits)
    index = student_logits.detach().topk(topk, dim=-1).indices  # (..., k)
    log_q = torch.log_softmax(student_logits.to(dtype).gather(-1, index), dim=-1)  # (..., k)
    log_pt = torch.log_softmax(teacher_logits.to(dtype), dim=-1).gather(-1, index)  # (..., k)
    return _kl(log_q, log_pt)


def _check_loss_args(mask, topk):
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")


def opd_loss(student_logits, teacher_logits, mask, topk=0):
    """
    E1 as a scalar: the mean of reverse_kl over positions where mask (...) is true (token mean over the batch).
    Only masked-in positions are computed, so nothing (not even NaN) reaches masked-out positions' gradients; the
    teacher is treated as data (no gradient). An all-false mask gives 0. topk > 0: the paper's estimate on the
    student's top-k support (see _topk_reverse_kl); topk >= V equals the exact loss.
    """
    _check_loss_args(mask, topk)
    kl = _topk_reverse_kl(student_logits[mask], teacher_logits[mask].detach(), topk)  # (n,)
    return kl.sum() / max(kl.numel(), 1)


def _chunk_kl_sum(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, topk, eos_ids):
    """Sum of per-position KL for one chunk of positions: (n, Hs), (V, Hs), (n, Ht), (V, Ht) -> scalar. The heads'
    logits are float32 even under autocast (trb_fast.head_logits); the exact KL overwrites the teacher's in place
    (trb_fast.ReverseKL)."""
    student_logits = canonicalise_eos(trb_fast.head_logits(student_hidden, student_head_weight), eos_ids)  # (n, V)
    with torch.no_grad():
        teacher_logits = canonicalise_eos(trb_fast.head_logits(teacher_hidden, teacher_head_weight), eos_ids)  # (n, V)
    if topk == 0:
        return trb_fast.ReverseKL.apply(student_logits, teacher_logits).sum()
    return _topk_reverse_kl(student_logits, teacher_logits, topk).sum()


def chunked_opd_loss(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask,
                     chunk_size=1024, topk=0, eos_ids=()):
    """
    E1 from hidden states: equal in value and gradients to
        opd_loss(student_hidden @ student_head_weight.T, teacher_hidden @ teacher_head_weight.T, mask, topk)
    without ever holding the (B, T, V) logits. Masked-in positions are gathered (n, H), processed `chunk_size` at a
    time, and each chunk is recomputed in the backward pass (activation checkpointing), so peak extra memory is about
    a few (chunk_size, V) float32 buffers. student_hidden (B, T, Hs), student_head_weight (V, Hs); the teacher's
    hidden size Ht may differ. eos_ids: with several, both models' logits are canonicalised (canonicalise_eos) per
    chunk, as opd_loss's callers do to the logits they pass.
    """
    _check_loss_args(mask, topk)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    hs = student_hidden[mask]  # (n, Hs)
    ht = teacher_hidden[mask].detach()  # (n, Ht)
    total = (hs.sum() * 0).to(trb_fast.compute_dtype(hs))  # 0, with a grad_fn even when no position is masked in
    for start in range(0, hs.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (hs[chunk], student_head_weight, ht[chunk], teacher_head_weight.detach(), topk, list(eos_ids))
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_kl_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_kl_sum(*args)
    return total / max(hs.shape[0], 1)


# -----------------------------------------------------------------------------
# Lockstep blended sampling of two Hugging Face causal LMs, each with its own KV cache (docs/method.md sections 2, 4).


@dataclass
class Rollout:
    """What blended_generate returns; every (B, N) field is aligned with the N generated columns."""
    sequences: torch.Tensor  # (B, P+N) the prompt exactly as given, then the generated tokens
    completion_mask: torch.Tensor  # (B, N) bool, generated tokens up to and including EOS
    beta: torch.Tensor  # (B, N) beta* used at each token (0 for the pure student and for SKD)
    behavior_logprobs: torch.Tensor  # (B, N) log mu*(token), the exact behavior distribution
    teacher_logprobs: torch.Tensor  # (B, N) log pi_T(token) at the rollout temperature (NaN: teacher not run)
    realised_kl: torch.Tensor  # (B, N) KL(mu* || pi_S) at each prefix
    teacher_entropy: torch.Tensor  # (B, N) H(pi_T) at each visited prefix (NaN: teacher not run)
    replaced: torch.Tensor  # (B, N) bool, SKD: the student's token was replaced by a teacher sample

    def stats(self):
        """Means over completion tokens of the diagnostics the training loop logs (docs/method.md section 7)."""
        m = self.completion_mask
        n = int(m.sum())

        def mean(x):
            return float(x[m].float().mean()) if n else math.nan

        return dict(beta=mean(self.beta), realised_kl=mean(self.realised_kl),
                    teacher_logprob=mean(self.teacher_logprobs), teacher_entropy=mean(self.teacher_entropy),
                    replaced_frac=mean(self.replaced), completion_tokens=n)


# The (B, N) columns blended_generate collects step by step, with their dtype when no token is generated.
ROLLOUT_COLUMNS = {"tokens": torch.long, "completion_mask": torch.bool, "beta": torch.float32,
                   "behavior_logprobs": torch.float32, "teacher_logprobs": torch.float32,
                   "realised_kl": torch.float32, "teacher_entropy": torch.float32, "replaced": torch.bool}


def position_ids(attention_mask):
    """(B, T) positions of a left-padded batch: 0 at each row's first real token (pads get 0, and are masked)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def canonicalise_eos(logits, eos_ids):
    """
    Merge every EOS id into one stop event at eos_ids[0] (docs/method.md section 4): its logit becomes the logsumexp of
    all EOS logits and the other EOS ids get -inf. Apply it to both models before blending and before the loss.
    """
    if len(eos_ids) <= 1:
        return logits
    merged = torch.logsumexp(logits[..., eos_ids], dim=-1)  # (...)
    logits = logits.clone()
    logits[..., eos_ids[1:]] = -math.inf
    logits[..., eos_ids[0]] = merged
    return logits


def _sample(log_probs, noise):
    """(B, V) log-probabilities -> (B,) token ids: the argmax when noise is None (greedy), else an exact draw by the
    exponential race argmax_a log p(a) - log E(a), E (B, V) ~ Exp(1) drawn by the caller (the Gumbel-max trick)."""
    if noise is None:
        return log_probs.argmax(dim=-1)
    return (log_probs - noise.log()).argmax(dim=-1)


def blend_token_rule(student_logits, teacher_logits, eps, noise):
    """
    The default token rule: solve beta* (E4) per row, then draw from mu_beta* (E3). teacher_logits is None when
    eps = 0 (pure student). eps: a float or a 0-d tensor. noise: None (greedy) or (draws, B, V) Exp(1) draws, where
    draws is the rule's `draws` attribute. A token rule returns a dict of (B,) tensors: `token` and the Rollout fields
    `beta`, `behavior_logprobs` (log mu(token)), `realised_kl` (KL(mu || pi_S)) and `replaced`. It is fixed-shape
    tensor code that torch.compile can trace whole (see trb_fast.may_read).
    """
    log_ps = torch.log_softmax(student_logits, dim=-1)  # (B, V)
    if teacher_logits is None:
        beta = torch.zeros_like(log_ps[:, 0])  # (B,)
        log_mu, kl = log_ps, torch.zeros_like(beta)
    else:
        beta = solve_beta(student_logits, teacher_logits, eps)  # (B,)
        log_mu = blend_logprobs(student_logits, teacher_logits, beta)  # (B, V)
        kl = _kl(log_mu, log_ps)
    token = _sample(log_mu, None if noise is None else noise[0])  # (B,)
    return dict(token=token, beta=beta, behavior_logprobs=log_mu.gather(-1, token[:, None]).squeeze(-1),
                realised_kl=kl, replaced=torch.zeros_like(token, dtype=torch.bool))


blend_token_rule.draws = 1


def skd_token_rule(top_k, teacher_temperature):
    """
    SKD-style interleaved injection (docs/method.md section 6): the student proposes a token; if it is not among the
    teacher's top_k, it is replaced by a fresh teacher sample at teacher_temperature (applied on top of the rollout
    temperature). The behavior distribution is known exactly:
        q(a) = pi_S(a) [a in top_k(pi_T)] + pi_S(outside top_k) * pi_T^(1/tau_T)(a).
    """
    def rule(student_logits, teacher_logits, eps, noise):
        log_ps = torch.log_softmax(student_logits, dim=-1)  # (B, V)
        log_pt_tau = torch.log_softmax(teacher_logits / teacher_temperature, dim=-1)  # (B, V)
        top = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1).indices  # (B, k)
        in_top = torch.zeros_like(log_ps, dtype=torch.bool).scatter_(-1, top, True)  # (B, V)
        proposal = _sample(log_ps, None if noise is None else noise[0])  # (B,)
        fresh = _sample(log_pt_tau, None if noise is None else noise[1])  # (B,)
        keep = in_top.gather(-1, proposal[:, None]).squeeze(-1)  # (B,)
        token = torch.where(keep, proposal, fresh)
        log_outside = torch.logsumexp(log_ps.masked_fill(in_top, -math.inf), dim=-1, keepdim=True)  # (B, 1)
        log_q = torch.logaddexp(log_ps.masked_fill(~in_top, -math.inf), log_outside + log_pt_tau)  # (B, V)
        return dict(token=token, beta=torch.zeros_like(log_ps[:, 0]),
                    behavior_logprobs=log_q.gather(-1, token[:, None]).squeeze(-1), realised_kl=_kl(log_q, log_ps),
                    replaced=~keep)
    rule.draws = 2  # the proposal and the teacher's replacement
    return rule


def _last_logits(model, ids, mask, positions, cache, vocab_size):
    """One forward of a model with its KV cache (updated in place): (B, V) float32 logits of the last position, on the
    shared tokenizer range."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=trb_fast.last_position(ids), **{trb_fast.CACHE_KEYWORD: cache})
    return out.logits[:, -1, :vocab_size].float()


def _feed(models, caches, token, mask, positions, vocab_size):
    """The per-token forwards after the prefill: each model is fed its newest token (B,); what compile=True compiles."""
    return [_last_logits(m, token[:, None], mask, positions, c, vocab_size) for m, c in zip(models, caches)]


def _pick(logits, eps, noise, token_rule, tau, eos_ids):
    """The token rule on the models' (B, V) logits (student first), divided by the temperature with the EOS ids merged,
    plus the teacher's view of the token."""
    logits = [canonicalise_eos(x / tau, eos_ids) for x in logits]
    student_logits, teacher_logits = logits[0], (logits[1] if len(logits) > 1 else None)
    step = token_rule(student_logits, teacher_logits, eps, noise)
    if teacher_logits is not None:
        log_pt = torch.log_softmax(teacher_logits, dim=-1)  # (B, V)
        step["teacher_logprobs"] = log_pt.gather(-1, step["token"][:, None]).squeeze(-1)
        step["teacher_entropy"] = -(log_pt.exp() * log_pt.nan_to_num(neginf=0.0)).sum(-1)
    else:
        step["teacher_logprobs"] = step["teacher_entropy"] = torch.full_like(step["beta"], math.nan)
    return step


def _check_generate_args(teacher, eps, temperature, token_rule, eos_token_id, pad_token_id):
    """blended_generate's argument checks: (token rule, whether the teacher runs, EOS ids as a list)."""
    if eps < 0 or math.isnan(eps):
        raise ValueError(f"eps must be >= 0 (inf allowed), got {eps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    token_rule = token_rule or blend_token_rule
    use_teacher = eps > 0 or token_rule is not blend_token_rule
    if use_teacher and teacher is None:
        raise ValueError("a teacher model is needed when eps > 0 or with a custom token_rule")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if eos_ids and pad_token_id is None:
        raise ValueError("pad_token_id is needed to pad rows that stop at EOS")
    return token_rule, use_teacher, eos_ids


@torch.no_grad()
def blended_generate(student, teacher, input_ids, attention_mask, *, eps, max_new_tokens, temperature=1.0,
                     eos_token_id=None, pad_token_id=None, generator=None, token_rule=None, vocab_size=None,
                     all_finished=None, decoding=None):
    """
    E2 rollouts: student and teacher decode in lockstep, each from its own KV cache, and every token is drawn from
    mu* = mu_beta* at budget eps (solved per row and step). eps = 0 is the pure student (the teacher is never run and
    may be None), eps = inf the pure teacher (mu_1 = pi_T on the student's support).

    input_ids, attention_mask: (B, P) left-padded prompts. temperature tau > 0 divides both models' logits before
    the blend; tau = 0 is greedy (argmax of mu* at tau = 1). eos_token_id: an int or a list; with several ids they are
    merged into one stop event emitted as eos_token_id[0] (canonicalise_eos). A row stops at its first EOS and emits
    pad_token_id after it. token_rule: how a token is chosen from the two models' (B, V) logits, default
    blend_token_rule (see skd_token_rule for another). vocab_size: the shared tokenizer range; padded head rows
    beyond it are never sampled (default: the narrower head). all_finished: callable(done (B,) bool) -> bool that
    decides when to stop; under FSDP it must agree across ranks (see train_fsdp.py). decoding: a Decoding (stop
    check, cache kind, compile). Sampling noise is drawn from generator in a fixed order: a seeded run reproduces.
    """
    token_rule, use_teacher, eos_ids = _check_generate_args(teacher, eps, temperature, token_rule, eos_token_id,
                                                            pad_token_id)
    decoding = decoding or Decoding()
    all_finished = all_finished or (lambda done: bool(done.all()))
    greedy, tau = temperature == 0, (temperature or 1.0)
    (B, P), device = input_ids.shape, input_ids.device
    models = [student] + ([teacher] if use_teacher else [])
    vocab_size = vocab_size or min(m.get_output_embeddings().weight.shape[0] for m in models)
    rows = decoding.rows(B)  # B, or more: extra rows (copies of row 0) are done from the start
    input_ids, attention_mask = (torch.cat([x, x[:1].expand(rows - B, -1)]) for x in (input_ids, attention_mask))

    def noise():  # (draws, rows, V) Exp(1) for the Gumbel-max draw (see _sample), drawn for the B real rows only
        if greedy:
            return None
        draws = getattr(token_rule, "draws", 1)
        real = torch.empty(draws, B, vocab_size, device=device).exponential_(generator=generator)
        return torch.cat([real, real.new_ones(draws, rows - B, vocab_size)], dim=1)

    # 1. Prefill each model once over the prompt; afterwards only the newest token is fed. A static cache's mask
    #    spans the whole cache (its future columns are masked causally); a dynamic one's grows by a column per token.
    length = trb_fast.static_cache_length(P, max_new_tokens) if decoding.cache == "static" else P
    caches = decoding.new_caches(models, rows, length)
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, length - P)], dim=-1)  # (rows, L)
    logits = [_last_logits(m, input_ids, mask, position_ids(attention_mask), c, vocab_size)  # per model (rows, V)
              for m, c in zip(models, caches)]
    positions = attention_mask.long().sum(-1, keepdim=True)  # (rows, 1) the next token's position in each row
    done = torch.arange(rows, device=device) >= B  # (rows,) rows that have emitted EOS (and the padding rows)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)  # (E,)
    columns = {name: [] for name in ROLLOUT_COLUMNS}  # per step, one (rows,) tensor for each (B, N) Rollout field
    for n in range(1, max_new_tokens + 1):
        # 2. Pick the step's token from both models' logits (the token rule), masked after EOS.
        step = _pick(logits, eps, noise(), token_rule, tau, eos_ids)
        token = step.pop("token")  # (rows,)
        if eos_ids:
            token = token.masked_fill(done, pad_token_id)
        step.update(tokens=token, completion_mask=~done)
        for name in ROLLOUT_COLUMNS:
            columns[name].append(step[name])
        # 3. Stop once every row has emitted EOS (asked every stop_check_every tokens).
        if eos_ids:
            done = done | torch.isin(token, eos)
        if n == max_new_tokens or (n % decoding.stop_check_every == 0 and all_finished(done)):
            break
        # 4. Feed the token to both caches.
        if decoding.cache == "dynamic":
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        logits = decoding.feed(_feed, models, caches, token, mask, positions, vocab_size)
        positions = positions + 1
    # The columns as (B, N) tensors of the real rows (N = 0: an empty one of the field's dtype).
    stacked = {name: torch.stack(column, dim=1)[:B] if column else torch.empty(B, 0, dtype=ROLLOUT_COLUMNS[name],
                                                                               device=device)
               for name, column in columns.items()}
    return Rollout(sequences=torch.cat([input_ids[:B], stacked.pop("tokens")], dim=1), **stacked)


# -----------------------------------------------------------------------------
# Behavior policies: the paper's baselines (docs/method.md section 6), each a small function of the optimisation step
# returning blended_generate's keyword arguments. cfg is any object with the attributes used below.


def _temperature_warmup(step, cfg):
    """Student only, its temperature annealed linearly from tau0 to cfg.temperature over warmup_steps."""
    progress = min(step / cfg.warmup_steps, 1.0) if cfg.warmup_steps else 1.0
    return dict(eps=0.0, temperature=cfg.tau0 + (cfg.temperature - cfg.tau0) * progress)


BEHAVIOR_POLICIES = {
    "opd": lambda step, cfg: dict(eps=0.0, temperature=cfg.temperature),
    "trb": lambda step, cfg: dict(eps=kl_budget(step, cfg.eps0, cfg.warmup_steps), temperature=cfg.temperature),
    "fixed_eps": lambda step, cfg: dict(eps=float(cfg.eps0), temperature=cfg.temperature),
    "skd": lambda step, cfg: dict(eps=0.0, temperature=cfg.temperature,
                                  token_rule=skd_token_rule(cfg.skd_top_k, cfg.skd_temperature)),
    "temperature_warmup": _temperature_warmup,
    "teacher": lambda step, cfg: dict(eps=math.inf, temperature=cfg.temperature),
}


def behavior(name, step, cfg):
    """blended_generate's keyword arguments (eps, temperature, token_rule) for policy `name` at step `step`."""
    if name not in BEHAVIOR_POLICIES:
        raise ValueError(f"unknown behavior policy {name!r}; choose one of {sorted(BEHAVIOR_POLICIES)}")
    return BEHAVIOR_POLICIES[name](step, cfg)


def behavior_needs_teacher(kwargs):
    """Whether a rollout with these blended_generate keyword arguments runs the teacher online."""
    return kwargs.get("eps", 0.0) > 0 or kwargs.get("token_rule") is not None
