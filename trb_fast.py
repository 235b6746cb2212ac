"""
The fast paths behind trb.py, each tested against the plain reference it stands in for:

- solve_beta: E4 (docs/method.md section 2) by Halley steps from the small-budget guess, on a workspace reused from
  call to call. Reference: trb.solve_beta_bisect, the paper's bisection, run in float64 by the tests.
- head_logits and ReverseKL: trb.chunked_opd_loss's memory path, float32 logits of a bf16 head without a float32
  copy of it, and the exact KL with its analytic gradient in place. Reference: trb.opd_loss on full logits.
- Decoding: blended_generate's options and what they keep between calls for speed, the static KV caches and the
  compiled per-token forward, with row padding so that a run compiles few shapes. Reference: the eager step with a
  dynamic cache.

Nothing here changes a result: every shortcut skips only work whose outcome every row would mask out, and every
compiled or cached path gives the eager, uncached tokens (tests/test_fast_decode.py, tests/test_math.py).
"""
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass

import torch

# -----------------------------------------------------------------------------
# The fast solver of E4.


class Workspace:
    """solve_beta's five (B, V) buffers, kept from one call to the next for one shape at a time (as a decode loop calls
    it; so one Workspace must not be shared by threads). Allocated anew, each call's blocks this large would be mapped
    and faulted in afresh by a fresh glibc process, and the solver's speed would depend on the allocator's history (2x
    apart on a CPU)."""

    def __init__(self):
        self.key, self.tensors = None, None

    def buffers(self, shape, dtype, device):
        if torch.compiler.is_compiling():  # a compiled solve plans its own buffers
            return [torch.empty(shape, dtype=dtype, device=device) for _ in range(5)]
        key = (tuple(shape), dtype, device)
        if key != self.key:
            self.key, self.tensors = key, [torch.empty(shape, dtype=dtype, device=device) for _ in range(5)]
        return self.tensors


WORKSPACE = Workspace()  # the one solve_beta uses unless given another


def _weighted_moments(weights, r, scratch):
    """sum_a weights(a) r(a)^k for k = 1, 2, 3, each (B,): one product buffer multiplied by r in place, then a cascade
    sum (exact to ~1e-7 relative; a float32 matmul over 151936 terms is off by ~2e-4)."""
    product = torch.mul(weights, r, out=scratch)  # (B, V)
    first = product.sum(dim=-1)
    second = product.mul_(r).sum(dim=-1)
    return first, second, product.mul_(r).sum(dim=-1)


class _Blend:
    """
    Evaluates the blend mu_beta of one (B, V) batch at per-row beta (B,) for the solver: A(beta) = log E_{pi_S}
    [exp(beta r)] and E_mu[r^k], k = 1, 2, 3, the inputs of KL(beta) = beta E_mu[r] - A(beta) and its derivatives.
    At eps ~ 1e-4 that KL is ~1e3 times smaller than the terms of a log-space evaluation, whose float32 rounding of
    log pi_S + beta r (|.| ~ 16) then swamps it. So the default evaluation is relative to pi_S,
        A = log1p( sum_a pi_S(a) (exp(beta r(a)) - 1) ),
        E_mu[r^k] = (E_S[r^k] + sum_a pi_S(a) (exp(beta r(a)) - 1) r^k) / Z,
    where every term is O(beta r) and its rounding (~6e-8 absolute, random) is weighted by pi_S, which keeps the KL to
    ~1e-5 relative. Rows where exp(beta r) could overflow (beta max r > 60: logits in the thousands) use the log-space
    form with a max shift and float64 accumulators.
    """

    def __init__(self, log_ps, r, ps, mass, ps_moments, work, scratch):
        self.log_ps, self.r, self.ps = log_ps, r, ps  # (B, V) log pi_S, r = log pi_T - log pi_S (centred), pi_S
        self.mass, self.ps_moments = mass, ps_moments  # (B,) pi_S mass on the joint support; sum pi_S r^2, r^3
        self.r_max = r.amax(dim=-1)  # (B,)
        self.work, self.scratch = work, scratch  # (B, V) reused by every evaluation

    def __call__(self, beta):
        """Returns A(beta) - log(mass) and E_mu[r], E_mu[r^2], E_mu[r^3], each (B,). Each row takes the relative form
        unless exp(beta r) could overflow there; both are computed and picked per row, except where the host may
        read the choice (see may_read) and one form serves every row."""
        relative = beta * self.r_max <= 60  # (B,)
        if may_read(relative) and bool(relative.all()):
            return self._relative(beta)
        if may_read(relative) and not bool(relative.any()):
            return self._log_space(beta)
        return tuple(torch.where(relative, x, y) for x, y in zip(self._relative(beta), self._log_space(beta)))

    def _relative(self, beta):
        weights = torch.mul(self.r, beta.unsqueeze(-1), out=self.work).exp_().sub_(1.0).mul_(self.ps)  # (B, V)
        excess = weights.sum(dim=-1)  # (B,) Z - mass
        first, second, third = _weighted_moments(weights, self.r, self.scratch)  # E_S[r] = 0: excess part only
        z = self.mass + excess
        return (torch.log1p(excess / self.mass), first / z, (self.ps_moments[0] + second) / z,
                (self.ps_moments[1] + third) / z)

    def _log_space(self, beta):
        w = torch.addcmul(self.log_ps, beta.unsqueeze(-1), self.r, out=self.work)  # (B, V) log of unnormalised mu
        w_max = w.amax(dim=-1, keepdim=True)  # (B, 1)
        e = w.sub_(w_max).exp_()  # (B, V) mu_beta * Z / exp(w_max)
        z = e.sum(dim=-1, dtype=torch.float64)
        first = torch.mul(e, self.r, out=self.scratch).sum(dim=-1, dtype=torch.float64) / z
        second = self.scratch.mul_(self.r).sum(dim=-1) / z.to(e.dtype)
        third = self.scratch.mul_(self.r).sum(dim=-1) / z.to(e.dtype)
        a = w_max.squeeze(-1) + torch.log(z) - torch.log(self.mass)
        return a.to(e.dtype), first.to(e.dtype), second, third


def may_read(x):
    """
    Whether the token rule may read x's values on the host: always, except inside a torch.compile trace. The rule is
    fixed-shape tensor code with masked updates, so it also runs with no read at all (and compiles whole); where it may
    read, it skips work whose result every row would mask out (a finished solve's iterations, a form no row needs).
    The result is the same either way: the skipped work changes no value that is returned. On a GPU each read waits
    for the device, but the rule's cost there is its kernel launches (one per op, each longer than the kernel itself
    at (B, V) = (16, 151936)): the reads cut them from ~7,300 per token to ~230, and a wait costs far less than that.
    """
    return not torch.compiler.is_compiling()


@torch.no_grad()
def solve_beta(student_logits, teacher_logits, eps, tol=1e-4, max_iter=50, workspace=None):
    """
    E4: beta* = max { beta in [0, 1] : KL(mu_beta || pi_S) <= eps }, per row of (..., V) logits.

    With r = log pi_T - log pi_S and A(beta) = log E_{pi_S}[exp(beta r)], the closed forms are
        KL(beta) = beta A' - A,   KL' = beta Var_mu[r],   KL'' = Var_mu[r] + beta E_mu[(r - E_mu r)^3].
    KL grows like beta^2 sigma^2 / 2, so sqrt(KL) is nearly linear in beta: we run Halley's method (cubically
    convergent) on g(beta) = sqrt(KL) - sqrt(eps), safeguarded by a bracket [lo, hi] that falls back to bisection,
    from the small-budget guess sqrt(2 eps / sigma^2) refined by the third cumulant (error O(beta^2), not O(beta)).
    A row stops at a beta whose evaluated KL is within `tol` (relative) of eps, at beta = 1 if that is feasible,
    one Halley step after a point whose KL is within 5% of eps and whose step is under 2% of beta (the step leaves a
    relative error of order 0.02^3), or at the feasible end of a bracket narrower than 1e-7. Usually one evaluation
    of the blend (see _Blend) after pi_S's own moments.
    eps: float >= 0 (inf allowed) or a tensor broadcastable to (...). Returns beta* (...) in the logits' float dtype
    (float32 for bf16/fp16 input). Rows whose supports are disjoint get beta* = 0 (no blend exists).
    Fixed-shape code: max_iter masked iterations, and a row that has stopped keeps its value; outside a torch.compile
    trace the loop ends once every row has stopped (see may_read), inside it runs them all. A row still open after
    max_iter returns the feasible end of its bracket. A bad eps raises, except inside a trace, where its rows get NaN.
    """
    dtype = compute_dtype(student_logits)
    batch_shape, V = student_logits.shape[:-1], student_logits.shape[-1]
    if not torch.is_tensor(eps) and not eps >= 0:  # a Python number is checked for free
        raise ValueError(f"eps must be >= 0 (inf allowed), got {eps}")
    eps = torch.as_tensor(eps, dtype=dtype, device=student_logits.device).expand(batch_shape).reshape(-1)  # (B,)
    free = may_read(eps)  # see may_read: inside a torch.compile trace, nothing below reads a value
    if free and not bool((eps >= 0).all()):
        raise ValueError("eps must be >= 0 (inf allowed)")
    if free and bool((eps == 0).all()):
        return torch.zeros_like(eps).reshape(batch_shape)  # mu* = pi_S: nothing to solve
    s = student_logits.reshape(-1, V).to(dtype)  # (B, V)
    t = teacher_logits.reshape(-1, V).to(dtype)  # (B, V)

    # Setup: log pi_S and r on the joint support, centred, and pi_S's own moments (the blend at 0+).
    # (B, V) each, overwritten here
    log_ps, r, ps, work, scratch = (workspace or WORKSPACE).buffers(s.shape, dtype, s.device)
    torch.log_softmax(s, dim=-1, out=log_ps)
    torch.log_softmax(t, dim=-1, out=r).sub_(log_ps)  # normalised first: raw t - s loses digits at |logit| ~ 1e3
    torch.exp(log_ps, out=ps)
    # A float32 log_softmax over ~1e5 tokens is normalised only to ~5e-6 (0.5% of a KL of 1e-3), so every A(beta)
    # is taken relative to pi_S's measured mass.
    mass = ps.sum(dim=-1)  # (B,) pi_S mass on the joint support (so far: all of it)
    log_norm = torch.log(mass)  # (B,)
    mean0 = torch.mul(ps, r, out=scratch).sum(dim=-1)  # (B,) mass * E_{pi_S}[r]; not finite iff a token is off the
    if not (free and bool(torch.isfinite(mean0).all())):  # joint support (probability 0 under one model)
        off = ~torch.isfinite(r)  # (B, V) +inf: student zero; -inf: teacher zero; NaN: both
        log_ps.masked_fill_(off, -math.inf), r.masked_fill_(off, 0.0), ps.masked_fill_(off, 0.0)
        mass = ps.sum(dim=-1)
        mean0 = torch.mul(ps, r, out=scratch).sum(dim=-1)
    a0 = torch.log(mass) - log_norm  # A(0+); KL(0+) = -A(0+), exactly 0 when the supports agree
    # Centre r under pi_S (a per-row shift the blend ignores) so that beta E_mu[r] and A(beta) stay small.
    r.sub_((mean0 / mass).unsqueeze(-1))
    _, second, third = _weighted_moments(ps, r, scratch)
    var0, skew0 = second / mass, third / mass  # (B,) sigma^2 and kappa_3 of r under pi_S
    blend = _Blend(log_ps, r, ps, mass, (second, third), work, scratch)
    done = (eps == 0) | ~torch.isfinite(a0) | (-a0 > eps)  # beta* = 0: no budget, disjoint supports, 0+ infeasible
    one = ~done & torch.isinf(eps)
    beta_star = torch.where(one, 1.0, torch.zeros_like(eps))  # (B,) final for every row that is done
    done = done | one

    # Initial guess: KL = sigma^2 beta^2 / 2 + kappa_3 beta^3 / 3 + O(beta^4).
    beta = torch.sqrt(2 * eps / var0)  # (B,) the small-budget guess
    beta = beta - skew0 * beta ** 3 / 3 / (var0 * beta + skew0 * beta ** 2)  # one Newton step on the cubic
    beta = beta.nan_to_num(1.0).clamp(1e-12, 1.0)
    lo, hi = torch.zeros_like(beta), torch.ones_like(beta)  # KL(lo) <= eps < KL(hi) once hi_known
    hi_known = torch.zeros_like(done)
    sqrt_eps = torch.sqrt(eps)
    # max_iter masked iterations: a row that is done keeps its beta_star. Where the host may read, the loop ends once
    # every row is done; the rest would change nothing.
    for _ in range(max_iter):
        if free and bool(done.all()):
            break
        a, m1, m2, m3 = blend(beta)
        kl = (beta * m1 - (a + a0)).clamp_min(0.0)  # KL(mu_beta || pi_S), A taken relative to pi_S
        accept = ~done & (((kl - eps).abs() <= tol * eps) | ((beta == 1.0) & (kl <= eps)))
        beta_star, done = torch.where(accept, beta, beta_star), done | accept
        feasible = kl <= eps
        lo, hi = torch.where(feasible, beta, lo), torch.where(feasible, hi, beta)
        hi_known = hi_known | ~feasible
        narrow = ~done & (hi - lo < 1e-7)
        beta_star, done = torch.where(narrow, lo, beta_star), done | narrow
        # Halley on g = sqrt(KL) - sqrt(eps): g' = KL' / (2 sqrt KL), g'' = KL'' / (2 sqrt KL) - KL'^2 / (4 KL^1.5).
        var = (m2 - m1 * m1).clamp_min(0.0)
        skew = m3 - 3 * m1 * m2 + 2 * m1 ** 3
        sqrt_kl = torch.sqrt(kl)
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
    beta_star = torch.where(done, beta_star, lo)  # out of iterations: the feasible end of the bracket
    return torch.where(eps >= 0, beta_star, math.nan).reshape(batch_shape)  # NaN for a bad eps where not checked


# -----------------------------------------------------------------------------
# The chunked loss's memory path: heads in float32 without float32 copies, the exact KL in place.


def compute_dtype(x):
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ReverseKL(torch.autograd.Function):
    """
    trb.reverse_kl(student_logits, teacher_logits) per position, (n, V) -> (n,), with the analytic gradient
    dKL/ds = pi_S (log pi_S - log pi_T - KL). It takes the teacher's logits to overwrite (a buffer no one else holds)
    and works in place, so one call holds three (n, V) buffers (student logits, pi_S, log pi_S - log pi_T) where
    autograd would hold about seven.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits):
        dtype = compute_dtype(student_logits)
        diff = teacher_logits.to(dtype)  # (n, V) the teacher's logits, soon log pi_S - log pi_T
        diff = diff.sub_(torch.logsumexp(diff, dim=-1, keepdim=True))  # log pi_T
        log_ps = torch.log_softmax(student_logits.to(dtype), dim=-1)  # (n, V)
        diff = diff.neg_().add_(log_ps)  # log pi_S - log pi_T
        ps = log_ps.exp_()  # (n, V) in place: log pi_S is not needed any more
        diff.masked_fill_(ps == 0, 0.0)  # student zeros contribute nothing, as in reverse_kl
        # (n,) cascade sums (a float32 matmul over the vocabulary is off by ~2e-4) over small row blocks, so that
        # no (n, V) temporary is held
        kl = torch.cat([(p * d).sum(dim=-1) for p, d in zip(ps.split(64), diff.split(64))])
        ctx.save_for_backward(ps, diff, kl)
        ctx.student_dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        ps, diff, kl = ctx.saved_tensors
        grad = (diff - kl.unsqueeze(-1)).mul_(ps).mul_(grad_kl.unsqueeze(-1))  # (n, V)
        return grad.to(ctx.student_dtype), None


HEAD_BLOCK_ROWS = 4096  # rows of a bf16 head cast to float32 at a time by head_logits (64 MiB of a 4096-wide head)


class Head(torch.autograd.Function):
    """
    hidden (n, H) @ weight (V, H).T in `dtype`, the weight's gradient written into one contiguous (V, H) tensor of the
    weight's own dtype, which autograd then sums over the chunks in place: two heads' worth at most (autograd's own
    matmul gradient, a transposed view, is summed out of place: three). A weight stored narrower than `dtype` (bf16)
    is cast HEAD_BLOCK_ROWS rows at a time, so no (V, H) float32 copy of it is ever held (2.3 GiB for the 8B
    teacher's head, per chunk), and its gradient is rounded to bf16 block by block, as autograd's cast would round it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, dtype):
        ctx.save_for_backward(hidden, weight)
        ctx.dtype = dtype
        h = hidden.to(dtype)
        logits = h.new_empty(h.shape[0], weight.shape[0])  # (n, V)
        for rows in head_blocks(weight, dtype):
            torch.mm(h, weight[rows].to(dtype).T, out=logits[:, rows])
        return logits

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        dtype, blocks = ctx.dtype, head_blocks(weight, ctx.dtype)
        h, grad_hidden, grad_weight = hidden.to(dtype), None, None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_hidden = torch.zeros_like(h)  # (n, H), summed over the blocks in `dtype`
                for rows in blocks:
                    grad_hidden.addmm_(grad[:, rows], weight[rows].to(dtype))
                grad_hidden = grad_hidden.to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = torch.empty_like(weight)  # (V, H)
                for rows in blocks:
                    if weight.dtype == dtype:
                        torch.mm(grad[:, rows].T, h, out=grad_weight[rows])
                    else:
                        grad_weight[rows] = grad[:, rows].T @ h  # (block, H), rounded to the weight's dtype
        return grad_hidden, grad_weight, None


def head_blocks(weight, dtype):
    """Row blocks of a head weight cast to dtype one at a time: all rows at once when it needs no cast."""
    step = weight.shape[0] if weight.dtype == dtype else HEAD_BLOCK_ROWS
    return [slice(i, i + step) for i in range(0, weight.shape[0], step)]


def head_logits(hidden, head_weight):
    """Logits (n, V) = hidden (n, H) @ head_weight (V, H).T in float32 (or float64) even under autocast: a bf16 matmul
    rounds its output, i.e. logits of magnitude ~30 by ~0.1. A bf16 weight is cast a block of rows at a time, never
    whole (Head)."""
    dtype = torch.promote_types(compute_dtype(hidden), compute_dtype(head_weight))
    with torch.autocast(hidden.device.type, enabled=False):
        return Head.apply(hidden, head_weight, dtype)


# -----------------------------------------------------------------------------
# Decoding's state between calls: static caches and the compiled per-token forward.


def static_cache_length(prompt_tokens, max_new_tokens):
    """
    Positions of a static KV cache for P prompt and N new tokens: P + N rounded up to a multiple of 1/8 of the power
    of two at or above it (at least 256), i.e. eight lengths per octave. Few lengths mean few compiled shapes: every
    P up to 1024 with N = 7168 gives 8192, with N = 8192 gives 10240. At most a quarter of the cache is spare.
    """
    n = prompt_tokens + max_new_tokens
    step = max(256, (1 << max(n - 1, 1).bit_length()) // 8)
    return -(-n // step) * step


def _cache_keyword():
    """The forward's name for its KV cache: `cache` from transformers 5.24 (which still accepts the old name, with a
    deprecation warning), `past_key_values` in earlier releases such as the 5.19 of the vLLM environment."""
    from transformers import Qwen3ForCausalLM
    return "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"


CACHE_KEYWORD = _cache_keyword()


def last_position(ids):
    """
    logits_to_keep for a forward of ids (B, T) whose head needs the last position only: the index (1,) of it, which
    gathers a contiguous (B, 1, H). logits_to_keep=1 slices a strided view instead, which torch.matmul multiplies by
    a per-row copy of a frozen head (18.5 GiB for the 8B teacher's 16-row prefill).
    """
    return torch.tensor([ids.shape[1] - 1], device=ids.device)


def padded_rows(rows):
    """Rows of a compiled decode call: the power of two at or above `rows` (the extra rows are done from the start)."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass
class Decoding:
    """
    How blended_generate decodes: options that change its speed and memory, never its tokens (tested), and what they
    keep from one call to the next. Use one object for a whole run.
    stop_check_every: ask all_finished only every this many tokens (each ask may be a collective and a host sync);
        rows done meanwhile emit pad_token_id, outside completion_mask.
    cache: "dynamic" (transformers' DynamicCache, grown token by token) or "static" (one StaticCache per model,
        preallocated for static_cache_length(P, max_new_tokens) positions).
    compile: torch.compile both models' per-token forwards as one step (CUDA graphs on a GPU); needs the static
        cache. The token rule always runs eagerly: its solver stops once every row has converged, which a graph
        cannot. A compiled step, and CUDA graphs above all, is specialised to the caches' buffers, so each model's
        static cache is kept and reset while its shape stays the same; kept caches stay allocated between calls,
        through the loss and evaluation (the memory plan counts them). Compiled code is specialised to its input
        shapes too, and dynamo stops after 8 of them for one function in one process (its recompile limit), so
        compiled calls pad their rows to a power of two (padded_rows; the extra rows are done from the start and draw
        no noise) and caches take few lengths: a training run with its evaluations needs about six. If a compile
        fails all the same, one warning says so and decoding goes on eagerly (`failed`).
    compile_backend: torch.compile's backend; "eager" keeps dynamo's guards and limits without code generation.
    """
    stop_check_every: int = 1
    cache: str = "dynamic"
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self):
        if self.stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {self.stop_check_every}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")
        if self.compile and self.cache != "static":
            raise ValueError("compile=True needs cache='static' (a growing cache changes shape at every token)")
        self.compiled, self.mode, self.failed = None, None, False  # the compiled forward, its mode, a failed compile
        self.kept = weakref.WeakKeyDictionary()  # model -> (rows, length, its StaticCache), with compile only

    def rows(self, batch_rows):
        """Rows a call decodes: the batch's, or with compile the power of two at or above it."""
        return padded_rows(batch_rows) if self.compile else batch_rows

    def new_caches(self, models, rows, length):
        """One KV cache per model: a DynamicCache, or a StaticCache of `length` positions (with compile: the kept one,
        reset, while rows and length stay the same)."""
        from transformers import DynamicCache, StaticCache
        if self.cache == "dynamic":
            return [DynamicCache(config=m.config) for m in models]
        if not self.compile:
            return [StaticCache(config=m.config, max_cache_len=length) for m in models]
        caches = []
        for model in models:
            kept = self.kept.get(model)
            if kept is not None and kept[:2] == (rows, length):
                kept[2].reset()
            else:
                kept = self.kept[model] = (rows, length, StaticCache(config=model.config, max_cache_len=length))
            caches.append(kept[2])
        return caches

    def feed(self, feed, *args):
        """feed(*args), compiled (on first use) unless compile is off or a compile has failed; then eager."""
        if not self.compile or self.failed:
            return feed(*args)
        if self.compiled is None:
            cuda = args[2].device.type == "cuda"  # args: models, caches, token, ...
            self.mode = "reduce-overhead" if cuda and self.compile_backend == "inductor" else None  # CUDA graphs
            self.compiled = torch.compile(feed, fullgraph=True, dynamic=False, mode=self.mode,
                                          backend=self.compile_backend)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs have been consumed
        try:
            return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - a compile that fails must not end a run; the step is rerun
            self.failed = True  # eagerly (it rewrites the same cache entries: a compile fails before any runs)
            warnings.warn(f"compile=True: the compiled decode step failed ({type(error).__name__}: "
                          f"{(str(error).splitlines() or [''])[0][:200]}); decoding goes on eagerly")
            return feed(*args)
