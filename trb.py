"""
Trust-Region Behavior Blending (TRB) for on-policy distillation.
Paper: Plyusov et al., "Trust-Region Behavior Blending for On-Policy Distillation", arXiv 2605.31159 (2026).

On-policy distillation (OPD) trains a student pi_S on prefixes it samples itself, with a per-prefix reverse KL to a
frozen teacher pi_T (E1). Early student rollouts are poor, so TRB samples warmup rollouts from the most teacher-like
distribution inside a KL trust region around the student (E2): a geometric blend of the two models (E3) whose
strength beta is solved per token (E4). The budget eps anneals to zero (E5), then training is plain OPD. TRB changes
only which prefixes are visited; the loss is always E1.

The labels E1-E5 are this project's, defined in docs/method.md, whose order this file follows. It imports nothing of
the project (the speed machinery is in distill/fast.py). Shapes: B batch, T time, P prompt, N new tokens, V vocab.

    equation                                              function
    E1  L = E_h[ KL(pi_S(.|h) || pi_T(.|h)) ]             reverse_kl, opd_loss
    E2  mu* = argmin KL(mu||pi_T) s.t. KL(mu||pi_S)<=eps  blended_generate (solve E4, then sample E3)
    E3  mu_beta ~ pi_S^(1-beta) * pi_T^beta               blend_logprobs
    E4  beta* = max{beta in [0,1]: KL(mu_beta||pi_S)<=eps} solve_beta_bisect (as stated), solve_beta (fast)
    E5  eps_k = eps_0 * (1 - k/K) for k < K, else 0       kl_budget
"""
import inspect
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache, Qwen3ForCausalLM

# -----------------------------------------------------------------------------
# The schedule (E5) and the blend (E3). Tensors in, tensors out.


def kl_budget(step, eps0, warmup_steps):
    """E5: eps_k = eps0 * (1 - k / K) for k < K, exactly 0.0 from k = K on; K = None keeps eps0 (fixed-eps)."""
    if eps0 < 0 or (warmup_steps is not None and warmup_steps <= 0):
        raise ValueError(f"need eps0 >= 0 and warmup_steps > 0 or None, got {eps0}, {warmup_steps}")
    if warmup_steps is None:
        return float(eps0)
    return float(eps0) * (1.0 - step / warmup_steps) if step < warmup_steps else 0.0


def compute_dtype(x):
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blend_terms(student_logits, teacher_logits):
    """log_ps = log pi_S on the joint support M (-inf off M), r = log pi_T - log pi_S (0 off M), each (..., V). Off M a
    token has weight 0 for every beta > 0: pi_S(a) = 0 (never feasible) or pi_T(a)^beta = 0 (docs/method.md sec. 2)."""
    dtype = compute_dtype(student_logits)
    log_ps = torch.log_softmax(student_logits.to(dtype), dim=-1)  # (..., V)
    # Normalise both first: raw t - s loses digits when logits are in the thousands.
    r = torch.log_softmax(teacher_logits.to(dtype), dim=-1).sub_(log_ps)  # (..., V)
    joint = torch.isfinite(r)  # (..., V) false where either model has probability 0
    return log_ps.masked_fill(~joint, -math.inf), r.masked_fill_(~joint, 0.0)


def blend_logprobs(student_logits, teacher_logits, beta):
    """E3: log mu_beta = log pi_S + beta * r - A(beta), normalised, (..., V); beta (...) or a float. Student zeros stay
    zero, teacher zeros get zero for beta > 0; beta = 0 and disjoint supports give log_softmax(student). Never NaN."""
    log_ps, r = _blend_terms(student_logits, teacher_logits)
    beta = torch.as_tensor(beta, dtype=log_ps.dtype, device=log_ps.device).expand(log_ps.shape[:-1])
    w = torch.addcmul(log_ps, beta.unsqueeze(-1), r)  # (..., V) on the joint support
    fallback = (beta == 0) | ~torch.isfinite(w.amax(dim=-1))  # (...)
    pure_student = torch.log_softmax(student_logits.to(log_ps.dtype), dim=-1)  # (..., V)
    return torch.where(fallback.unsqueeze(-1), pure_student, torch.log_softmax(w, dim=-1))


def _kl(log_p, log_q):
    """KL(p || q) over the last dim of log-probabilities, with 0 log 0 = 0 (also in the gradient)."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim=-1)  # masked before the product: no 0 * inf


# -----------------------------------------------------------------------------
# The solve (E4): the paper's bisection, and the fast solver the sampler calls (tested against it in float64).


@torch.no_grad()
def solve_beta_bisect(student_logits, teacher_logits, eps, iters=50):
    """E4 as the paper states it: beta* = max {beta in [0, 1]: KL(mu_beta || pi_S) <= eps}, by bisection (the KL grows
    monotonically in beta) to 2^-iters. eps: a float or a tensor of the batch shape; disjoint supports give 0."""
    log_ps, r = _blend_terms(student_logits, teacher_logits)  # (..., V) on the joint support of the two models
    eps = torch.as_tensor(eps, dtype=log_ps.dtype, device=log_ps.device).expand(log_ps.shape[:-1])

    def realised_kl(beta):  # KL(mu_beta || pi_S); NaN where the supports are disjoint: never <= eps, so infeasible
        return _kl(torch.log_softmax(log_ps + beta.unsqueeze(-1) * r, dim=-1), log_ps)
    lo, hi = torch.zeros_like(eps), torch.ones_like(eps)  # KL(lo) <= eps < KL(hi), unless beta* = 1
    for _ in range(iters):
        mid = (lo + hi) / 2
        feasible = realised_kl(mid) <= eps
        lo, hi = torch.where(feasible, mid, lo), torch.where(feasible, hi, mid)
    beta = torch.where(realised_kl(torch.ones_like(eps)) <= eps, 1.0, lo)
    return torch.where(eps == 0, 0.0, beta)  # eps = 0 is pi_S itself, even where the models agree


def may_read(x):
    """Whether host reads of x may skip masked-out work (same result, ~30x fewer GPU launches): not in torch.compile."""
    return not torch.compiler.is_compiling()


def _moments(weights, r, scratch):
    """sum_a weights(a) r(a)^k, k = 1, 2, 3, each (B,), by cascade sums in one (B, V) buffer (matmul: ~2e-4 off)."""
    product = torch.mul(weights, r, out=scratch)  # (B, V)
    return product.sum(dim=-1), product.mul_(r).sum(dim=-1), product.mul_(r).sum(dim=-1)


def _blend_moments(beta, log_ps, r, ps, mass, ps_moments, work, scratch):
    """A(beta) - log(mass) and E_mu[r^k], k = 1, 2, 3, each (B,), for KL(beta) = beta E_mu[r] - A(beta). At eps ~ 1e-4
    that KL is ~1e3 times smaller than log pi_S + beta r, so it is taken relative to pi_S, A = log1p(sum_a pi_S
    (exp(beta r) - 1)), every term O(beta r); rows where exp(beta r) could overflow take the log-space form."""
    relative = beta * r.amax(dim=-1) <= 60  # (B,)
    forms = []
    if not (may_read(relative) and not bool(relative.any())):
        weights = torch.mul(r, beta.unsqueeze(-1), out=work).exp_().sub_(1.0).mul_(ps)  # (B, V)
        excess = weights.sum(dim=-1)  # (B,) Z - mass
        first, second, third = _moments(weights, r, scratch)  # E_S[r] = 0 (r is centred): the excess part only
        z = mass + excess
        forms.append((torch.log1p(excess / mass), first / z, (ps_moments[0] + second) / z, (ps_moments[1] + third) / z))
    if not (may_read(relative) and bool(relative.all())):
        e = torch.addcmul(log_ps, beta.unsqueeze(-1), r, out=work)  # (B, V) log of the unnormalised blend
        shift = e.amax(dim=-1, keepdim=True)  # (B, 1)
        e = e.sub_(shift).exp_()
        z = e.sum(dim=-1, dtype=torch.float64)
        first = torch.mul(e, r, out=scratch).sum(dim=-1, dtype=torch.float64) / z
        second, third = scratch.mul_(r).sum(dim=-1) / z.to(e.dtype), scratch.mul_(r).sum(dim=-1) / z.to(e.dtype)
        a = shift.squeeze(-1) + torch.log(z) - torch.log(mass)
        forms.append((a.to(e.dtype), first.to(e.dtype), second, third))
    return forms[0] if len(forms) == 1 else tuple(torch.where(relative, x, y) for x, y in zip(*forms))


@torch.no_grad()
def solve_beta(student_logits, teacher_logits, eps, tol=1e-4, max_iter=50, buffers=None):
    """E4, fast: solve_beta_bisect's beta* for about one blend evaluation instead of 50. With A(beta) =
    log E_{pi_S}[exp(beta r)]: KL = beta A' - A, KL' = beta Var_mu[r], KL'' = Var_mu[r] + beta E_mu[(r - E_mu r)^3].
    KL grows like beta^2 sigma^2 / 2, so Halley steps on g = sqrt(KL) - sqrt(eps) (nearly linear in beta) from the
    small-budget guess sqrt(2 eps / sigma^2), refined by the third cumulant, inside a bracket that falls back to
    bisection (docs/method.md section 2), until KL is within `tol` (relative) of eps. eps >= 0 (inf allowed): a float
    or a tensor broadcastable to (...); beta* (...) in compute_dtype. Compiled, a bad eps gives NaN, not an error.
    buffers(shape, dtype, device): five (B, V) tensors to overwrite, kept by a caller that solves token after token."""
    dtype, batch_shape, V = compute_dtype(student_logits), student_logits.shape[:-1], student_logits.shape[-1]
    if not torch.is_tensor(eps) and not eps >= 0:
        raise ValueError(f"eps must be >= 0 (inf allowed), got {eps}")
    eps = torch.as_tensor(eps, dtype=dtype, device=student_logits.device).expand(batch_shape).reshape(-1)  # (B,)
    free = may_read(eps)
    if free and not bool((eps >= 0).all()):
        raise ValueError("eps must be >= 0 (inf allowed)")
    if free and bool((eps == 0).all()):
        return torch.zeros_like(eps).reshape(batch_shape)  # mu* = pi_S: nothing to solve
    s, t = student_logits.reshape(-1, V).to(dtype), teacher_logits.reshape(-1, V).to(dtype)  # (B, V)
    new = [torch.empty_like(s) for _ in range(5)] if buffers is None else buffers(s.shape, dtype, s.device)
    log_ps, r, ps, work, scratch = new  # (B, V) each, written in place below
    # Setup: log pi_S and r on the joint support, centred, and pi_S's own moments (the blend at 0+).
    torch.log_softmax(s, dim=-1, out=log_ps)
    torch.log_softmax(t, dim=-1, out=r).sub_(log_ps)
    torch.exp(log_ps, out=ps)
    mass = ps.sum(dim=-1)  # (B,)
    log_norm = torch.log(mass)  # a float32 log_softmax is normalised to ~5e-6 only: A is taken relative to the mass
    mean0 = torch.mul(ps, r, out=scratch).sum(dim=-1)  # (B,) not finite iff a token is off the joint support
    if not (free and bool(torch.isfinite(mean0).all())):
        off = ~torch.isfinite(r)  # (B, V) +inf: student zero; -inf: teacher zero; NaN: both
        log_ps.masked_fill_(off, -math.inf), r.masked_fill_(off, 0.0), ps.masked_fill_(off, 0.0)
        mass, mean0 = ps.sum(dim=-1), torch.mul(ps, r, out=scratch).sum(dim=-1)
    a0 = torch.log(mass) - log_norm  # A(0+); KL(0+) = -A(0+), exactly 0 when the supports agree
    r.sub_((mean0 / mass).unsqueeze(-1))  # centred under pi_S (a shift the blend ignores): small A and beta E_mu[r]
    _, second, third = _moments(ps, r, scratch)
    var0, skew0 = second / mass, third / mass  # (B,) sigma^2 and kappa_3 of r under pi_S
    done = (eps == 0) | ~torch.isfinite(a0) | (-a0 > eps)  # beta* = 0: no budget, disjoint supports, 0+ infeasible
    one = ~done & torch.isinf(eps)
    beta_star, done = torch.where(one, 1.0, torch.zeros_like(eps)), done | one  # (B,) final where done
    # Initial guess: KL = sigma^2 beta^2 / 2 + kappa_3 beta^3 / 3 + O(beta^4), one Newton step on the cubic.
    beta = torch.sqrt(2 * eps / var0)
    beta = (beta - skew0 * beta ** 3 / 3 / (var0 * beta + skew0 * beta ** 2)).nan_to_num(1.0).clamp(1e-12, 1.0)
    lo, hi, hi_known = torch.zeros_like(beta), torch.ones_like(beta), torch.zeros_like(done)  # KL(lo) <= eps < KL(hi)
    sqrt_eps = torch.sqrt(eps)
    for _ in range(max_iter):  # masked iterations: a row that is done keeps its beta_star
        if free and bool(done.all()):
            break
        a, m1, m2, m3 = _blend_moments(beta, log_ps, r, ps, mass, (second, third), work, scratch)
        kl = (beta * m1 - (a + a0)).clamp_min(0.0)  # KL(mu_beta || pi_S)
        accept = ~done & (((kl - eps).abs() <= tol * eps) | ((beta == 1.0) & (kl <= eps)))
        beta_star, done = torch.where(accept, beta, beta_star), done | accept
        feasible = kl <= eps
        lo, hi, hi_known = torch.where(feasible, beta, lo), torch.where(feasible, hi, beta), hi_known | ~feasible
        narrow = ~done & (hi - lo < 1e-7)
        beta_star, done = torch.where(narrow, lo, beta_star), done | narrow
        # Halley on g = sqrt(KL) - sqrt(eps): g' = KL' / (2 sqrt KL), g'' = KL'' / (2 sqrt KL) - KL'^2 / (4 KL^1.5).
        var, skew, sqrt_kl = (m2 - m1 * m1).clamp_min(0.0), m3 - 3 * m1 * m2 + 2 * m1 ** 3, torch.sqrt(kl)
        g, g1 = sqrt_kl - sqrt_eps, beta * var / (2 * sqrt_kl)
        g2 = (var + beta * skew) / (2 * sqrt_kl) - g1 * g1 / sqrt_kl
        step = 2 * g * g1 / (2 * g1 * g1 - g * g2)
        step = torch.where(torch.isfinite(step) & (step * g >= 0), step, g / g1)  # Newton if Halley misbehaves
        new = beta - step
        new = torch.where(~hi_known & (new >= 1.0), torch.ones_like(new), new)
        inside = torch.isfinite(new) & (new > lo) & ((new < hi) | (~hi_known & (new == 1.0)))
        near = (kl - eps).abs() <= 0.05 * eps  # guards steep KL curves, where a small step proves nothing
        converged = ~done & inside & near & (step.abs() <= 0.02 * beta) & (new < 1.0)
        beta_star, done = torch.where(converged, new, beta_star), done | converged
        beta = torch.where(inside, new, (lo + hi) / 2)
    return torch.where(eps >= 0, torch.where(done, beta_star, lo), math.nan).reshape(batch_shape)  # not done: lo


# -----------------------------------------------------------------------------
# The loss (E1).


def reverse_kl(student_logits, teacher_logits):
    """E1 per position: KL(pi_S || pi_T) = sum_a pi_S(a) (log pi_S(a) - log pi_T(a)), (...), in at least float32.
    Student zeros contribute 0 (also to the gradient); a teacher zero where the student is not makes it +inf."""
    dtype = compute_dtype(student_logits)
    return _kl(torch.log_softmax(student_logits.to(dtype), dim=-1), torch.log_softmax(teacher_logits.to(dtype), dim=-1))


def topk_reverse_kl(student_logits, teacher_logits, topk):
    """E1 per position, exact for topk = 0 or >= V; else the paper's estimate (docs/method.md section 1) KL(q || pi_T):
    S_k the topk tokens of highest student logit (no gradient), q = pi_S renormalised on S_k, pi_T on the full vocab."""
    if topk == 0 or topk >= student_logits.shape[-1]:
        return reverse_kl(student_logits, teacher_logits)
    dtype = compute_dtype(student_logits)
    index = student_logits.detach().topk(topk, dim=-1).indices  # (..., k)
    log_q = torch.log_softmax(student_logits.to(dtype).gather(-1, index), dim=-1)  # (..., k)
    return _kl(log_q, torch.log_softmax(teacher_logits.to(dtype), dim=-1).gather(-1, index))


def opd_loss(student_logits, teacher_logits, mask, topk=0):
    """E1 as a scalar: the token mean of the per-position KL where mask (...) is true (0 if none). Only masked-in
    positions are computed, so not even a NaN reaches the others' gradients; the teacher gets no gradient."""
    if mask.dtype != torch.bool or topk < 0:
        raise ValueError(f"need a bool mask and topk >= 0, got {mask.dtype}, {topk}")
    kl = topk_reverse_kl(student_logits[mask], teacher_logits[mask].detach(), topk)  # (n,)
    return kl.sum() / max(kl.numel(), 1)


def canonicalise_eos(logits, eos_ids):
    """Merge every EOS id into one stop event at eos_ids[0] (docs/method.md section 4): its logit becomes the logsumexp
    of all EOS logits and the others get -inf. Applied to both models before blending and before the loss."""
    if len(eos_ids) <= 1:
        return logits
    merged, logits = torch.logsumexp(logits[..., eos_ids], dim=-1), logits.clone()  # (...); a copy to edit
    logits[..., eos_ids[1:]] = -math.inf
    logits[..., eos_ids[0]] = merged
    return logits


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


def position_ids(attention_mask):
    """(B, T) positions of a left-padded batch: 0 at each row's first real token (pads get 0, and are masked)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _sample(log_probs, u):
    """(B, V) log-probabilities -> (B,) token ids: the argmax for u None (greedy), else the exact draw by inverse CDF
    for u (B,) ~ U[0, 1): the first token whose float64 cumulative probability (a token is lost to rounding only below
    1e-16 of the mass before it) passes u * total, a target kept below the total, so never a zero-probability token."""
    if u is None:
        return log_probs.argmax(dim=-1)
    cdf = log_probs.to(torch.float64, copy=True).exp_().cumsum_(-1)  # (B, V)
    target = torch.minimum(u[:, None] * cdf[:, -1:], torch.nextafter(cdf[:, -1:], torch.zeros_like(cdf[:, -1:])))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def blend_token_rule(student_logits, teacher_logits, eps, u, buffers=None):
    """The default token rule: beta* (E4) per row (buffers: solve_beta's), a draw from mu_beta* (E3); no teacher: pi_S.
    u: None (greedy) or (draws, B) U[0, 1). Returns (B,) token, beta, behavior_logprobs, realised_kl, replaced."""
    log_ps = torch.log_softmax(student_logits, dim=-1)  # (B, V)
    if teacher_logits is None:
        beta = torch.zeros_like(log_ps[:, 0])  # (B,)
        log_mu, kl = log_ps, torch.zeros_like(beta)
    else:
        beta = solve_beta(student_logits, teacher_logits, eps, buffers=buffers)  # (B,)
        log_mu = blend_logprobs(student_logits, teacher_logits, beta)  # (B, V)
        kl = _kl(log_mu, log_ps)
    token = _sample(log_mu, None if u is None else u[0])  # (B,)
    return dict(token=token, beta=beta, behavior_logprobs=log_mu.gather(-1, token[:, None]).squeeze(-1),
                realised_kl=kl, replaced=torch.zeros_like(token, dtype=torch.bool))


blend_token_rule.draws = 1


def skd_token_rule(top_k, teacher_temperature):
    """SKD-style injection (docs/method.md section 6): the student proposes a token; outside the teacher's top_k a fresh
    teacher sample at teacher_temperature replaces it. The behavior distribution is known exactly:
        q(a) = pi_S(a) [a in top_k(pi_T)] + pi_S(outside top_k) * pi_T^(1/tau_T)(a)."""
    def rule(student_logits, teacher_logits, eps, u, buffers=None):
        log_ps = torch.log_softmax(student_logits, dim=-1)  # (B, V)
        log_pt_tau = torch.log_softmax(teacher_logits / teacher_temperature, dim=-1)  # (B, V)
        top = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1).indices  # (B, k)
        in_top = torch.zeros_like(log_ps, dtype=torch.bool).scatter_(-1, top, True)  # (B, V)
        proposal = _sample(log_ps, None if u is None else u[0])  # (B,)
        fresh = _sample(log_pt_tau, None if u is None else u[1])  # (B,)
        keep = in_top.gather(-1, proposal[:, None]).squeeze(-1)  # (B,)
        token = torch.where(keep, proposal, fresh)
        log_outside = torch.logsumexp(log_ps.masked_fill(in_top, -math.inf), dim=-1, keepdim=True)  # (B, 1)
        log_q = torch.logaddexp(log_ps.masked_fill(~in_top, -math.inf), log_outside + log_pt_tau)  # (B, V)
        return dict(token=token, beta=torch.zeros_like(log_ps[:, 0]), realised_kl=_kl(log_q, log_ps),
                    behavior_logprobs=log_q.gather(-1, token[:, None]).squeeze(-1), replaced=~keep)
    rule.draws = 2  # the proposal and the teacher's replacement
    return rule


# The forward's name for its KV cache: `cache` from transformers 5.24, `past_key_values` before (the vLLM environment).
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"


def _last_logits(model, ids, mask, positions, cache, vocab_size):
    """One forward with the model's KV cache (updated in place): (B, V) float32 logits of the last position, kept by its
    index (1,), which gathers a contiguous (B, 1, H) (a logits_to_keep=1 slice would be a strided view)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=torch.tensor([ids.shape[1] - 1], device=ids.device), **{CACHE_KEYWORD: cache})
    return out.logits[:, -1, :vocab_size].float()


def _feed(models, caches, token, mask, positions, vocab_size):
    """The per-token forwards after the prefill: each model is fed its newest token (B,)."""
    return [_last_logits(m, token[:, None], mask, positions, c, vocab_size) for m, c in zip(models, caches)]


class Decoding:
    """blended_generate's KV caches and forwards (here DynamicCache, eager); stand-ins (distill/fast.py) never change a
    token. stop_check_every: tokens per all_finished call; cache: "dynamic" (mask grows per token) or "static"; rows(B):
    rows to decode (extras copy row 0, done); new_caches(models, rows, P, N) -> (caches, length); feed(step, *args);
    solver_buffers: None, or solve_beta's buffers kept from token to token."""
    stop_check_every, cache, solver_buffers = 1, "dynamic", None

    def rows(self, batch_rows):
        return batch_rows

    def new_caches(self, models, rows, prompt_tokens, max_new_tokens):
        return [DynamicCache(config=m.config) for m in models], prompt_tokens

    def feed(self, step, *args):
        return step(*args)


@torch.no_grad()
def blended_generate(student, teacher, input_ids, attention_mask, *, eps, max_new_tokens, temperature=1.0,
                     eos_token_id=None, pad_token_id=None, generator=None, token_rule=None, vocab_size=None,
                     all_finished=None, decoding=None):
    """E2 rollouts: student and teacher decode in lockstep, every token drawn from mu* = mu_beta* at budget eps (beta*
    solved per row and step). eps = 0 is the pure student (the teacher is never run, may be None), eps = inf the pure
    teacher (mu_1 = pi_T on the student's support). input_ids, attention_mask: (B, P) left-padded prompts. temperature
    tau divides both logits; 0 is greedy. eos_token_id (int or list): one stop event (canonicalise_eos); a row emits
    pad_token_id after its first EOS. token_rule: see blend_token_rule. all_finished(done (B,)) -> bool: when to stop;
    under FSDP it must agree across ranks (train_fsdp.py). decoding: see Decoding. A seeded generator reproduces."""
    if eps < 0 or math.isnan(eps) or temperature < 0:
        raise ValueError(f"need eps >= 0 (inf allowed) and temperature >= 0, got {eps}, {temperature}")
    token_rule, decoding = token_rule or blend_token_rule, decoding or Decoding()
    use_teacher = eps > 0 or token_rule is not blend_token_rule
    if use_teacher and teacher is None:
        raise ValueError("a teacher model is needed when eps > 0 or with a custom token_rule")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if eos_ids and pad_token_id is None:
        raise ValueError("pad_token_id is needed to pad rows that stop at EOS")
    all_finished = all_finished or (lambda done: bool(done.all()))
    greedy, tau, (B, P), device = temperature == 0, (temperature or 1.0), input_ids.shape, input_ids.device
    models = [student] + ([teacher] if use_teacher else [])
    vocab_size = vocab_size or min(m.get_output_embeddings().weight.shape[0] for m in models)
    rows = decoding.rows(B)
    input_ids, attention_mask = (torch.cat([x, x[:1].expand(rows - B, -1)]) for x in (input_ids, attention_mask))

    def uniforms():  # (draws, rows) U[0, 1): one per draw and real row, in a fixed order; the extra rows get 0
        if greedy:
            return None
        real = torch.rand(getattr(token_rule, "draws", 1), B, dtype=torch.float64, device=device, generator=generator)
        return torch.cat([real, real.new_zeros(real.shape[0], rows - B)], dim=1)
    # 1. Prefill each model once over the prompt; afterwards only the newest token is fed.
    caches, length = decoding.new_caches(models, rows, P, max_new_tokens)
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, length - P)], dim=-1)  # (rows, L)
    logits = [_last_logits(m, input_ids, mask, position_ids(attention_mask), c, vocab_size)  # per model (rows, V)
              for m, c in zip(models, caches)]
    positions = attention_mask.long().sum(-1, keepdim=True)  # (rows, 1) the next token's position in each row
    done = torch.arange(rows, device=device) >= B  # (rows,) rows that have emitted EOS (and the extra rows)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)  # (E,)
    columns = []  # per step, a dict of (rows,) tensors: the token and the Rollout fields
    for n in range(1, max_new_tokens + 1):
        # 2. Pick the token: both models' logits at the temperature with one stop event, then the token rule.
        step_logits = [canonicalise_eos(x / tau if tau != 1 else x, eos_ids) for x in logits]  # no copy at tau 1
        teacher_logits = step_logits[1] if use_teacher else None
        step = token_rule(step_logits[0], teacher_logits, eps, uniforms(), decoding.solver_buffers)
        if use_teacher:
            log_pt = torch.log_softmax(teacher_logits, dim=-1)  # (rows, V)
            step["teacher_logprobs"] = log_pt.gather(-1, step["token"][:, None]).squeeze(-1)
            step["teacher_entropy"] = -(log_pt.exp() * log_pt.nan_to_num(neginf=0.0)).sum(-1)
        else:
            step["teacher_logprobs"] = step["teacher_entropy"] = torch.full_like(step["beta"], math.nan)
        token = step["token"].masked_fill(done, pad_token_id) if eos_ids else step["token"]  # (rows,)
        columns.append(dict(step, token=token, completion_mask=~done))
        # 3. Stop once every row has emitted EOS (asked every stop_check_every tokens).
        done = done | torch.isin(token, eos) if eos_ids else done
        if n == max_new_tokens or (n % decoding.stop_check_every == 0 and all_finished(done)):
            break
        # 4. Feed the token to both caches.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1) if decoding.cache == "dynamic" else mask
        logits = decoding.feed(_feed, models, caches, token, mask, positions, vocab_size)
        positions = positions + 1
    empty = dict(token=torch.long, completion_mask=torch.bool, replaced=torch.bool)  # dtypes when N = 0
    stacked = {name: torch.stack([c[name] for c in columns], dim=1)[:B] if columns else
               torch.empty(B, 0, dtype=empty.get(name, torch.float32), device=device)
               for name in ("token", "completion_mask", "beta", "behavior_logprobs", "teacher_logprobs",
                            "realised_kl", "teacher_entropy", "replaced")}
    return Rollout(sequences=torch.cat([input_ids[:B], stacked.pop("token")], dim=1), **stacked)


# -----------------------------------------------------------------------------
# Behavior policies, the paper's baselines (docs/method.md section 6): (step, cfg) -> blended_generate's kwargs.


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
