"""
The speed machinery behind trb.py, none of it the method, each piece tested against the plain reference it stands in
for:

- chunked_opd_loss: E1 from hidden states, never holding the (B, T, V) logits. head_logits and ReverseKL are its
  memory path: float32 logits of a bf16 head without a float32 copy of it, and the exact KL with its analytic
  gradient in place. Reference: trb.opd_loss on full logits (tests/test_math.py).
- Decoding: trb.blended_generate's `decoding` with options, static KV caches and the compiled per-token forward kept
  between calls, with row padding so that a run compiles few shapes, and the solver's buffers kept from token to
  token (SolverBuffers). Reference: trb.Decoding, the eager step with a dynamic cache (tests/test_fast_decode.py).

Nothing here changes a result: every compiled or cached path gives the eager, uncached tokens.
"""
import warnings
import weakref
from dataclasses import dataclass

import torch
from transformers import StaticCache

import trb

# -----------------------------------------------------------------------------
# The chunked loss's memory path: heads in float32 without float32 copies, the exact KL in place.


class ReverseKL(torch.autograd.Function):
    """
    trb.reverse_kl(student_logits, teacher_logits) per position, (n, V) -> (n,), with the analytic gradient
    dKL/ds = pi_S (log pi_S - log pi_T - KL). It takes the teacher's logits to overwrite (a buffer no one else holds)
    and works in place, so one call holds three (n, V) buffers (student logits, pi_S, log pi_S - log pi_T) where
    autograd would hold about seven.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits):
        dtype = trb.compute_dtype(student_logits)
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
FP32_BYTES = 4


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
        return *head_grads(grad, hidden, weight, ctx.dtype, *ctx.needs_input_grad[:2]), None


def head_grads(grad, hidden, weight, dtype, want_hidden, want_weight, weight_grad=None):
    """The gradients of head_logits(hidden, weight) (n, V) given grad (n, V): hidden's (n, H) in its dtype, and the
    weight's (V, H) in its dtype, added into weight_grad where given (else a new tensor); None where not wanted."""
    blocks, h, grad_hidden = head_blocks(weight, dtype), hidden.to(dtype), None
    with torch.autocast(grad.device.type, enabled=False):
        if want_hidden:
            grad_hidden = torch.zeros_like(h)  # (n, H), summed over the blocks in `dtype`
            for rows in blocks:
                grad_hidden.addmm_(grad[:, rows], weight[rows].to(dtype))
            grad_hidden = grad_hidden.to(hidden.dtype)
        if want_weight:
            weight_grad = torch.zeros_like(weight) if weight_grad is None else weight_grad  # (V, H)
            for rows in blocks:
                if weight.dtype == dtype:
                    weight_grad[rows].addmm_(grad[:, rows].T, h)
                else:
                    weight_grad[rows] += (grad[:, rows].T @ h).to(weight.dtype)  # (block, H), rounded to bf16
    return grad_hidden, weight_grad if want_weight else None


def head_blocks(weight, dtype):
    """Row blocks of a head weight cast to dtype one at a time: all rows at once when it needs no cast."""
    step = weight.shape[0] if weight.dtype == dtype else HEAD_BLOCK_ROWS
    return [slice(i, i + step) for i in range(0, weight.shape[0], step)]


def head_logits(hidden, head_weight):
    """Logits (n, V) = hidden (n, H) @ head_weight (V, H).T in float32 (or float64) even under autocast: a bf16 matmul
    rounds its output, i.e. logits of magnitude ~30 by ~0.1. A bf16 weight is cast a block of rows at a time, never
    whole (Head)."""
    dtype = torch.promote_types(trb.compute_dtype(hidden), trb.compute_dtype(head_weight))
    with torch.autocast(hidden.device.type, enabled=False):
        return Head.apply(hidden, head_weight, dtype)


def _chunk_kl_sum(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, topk, eos_ids):
    """Sum of per-position KL for one chunk of positions: (n, Hs), (V, Hs), (n, Ht), (V, Ht) -> scalar. The heads'
    logits are float32 even under autocast (head_logits); the exact KL overwrites the teacher's in place
    (ReverseKL)."""
    return _logits_kl_sum(head_logits(student_hidden, student_head_weight), teacher_hidden, teacher_head_weight, topk,
                          eos_ids)


def _logits_kl_sum(student_logits, teacher_hidden, teacher_head_weight, topk, eos_ids):
    """_chunk_kl_sum from the student's raw logits (n, V)."""
    student_logits = trb.canonicalise_eos(student_logits, eos_ids)  # (n, V)
    with torch.no_grad():
        teacher_logits = trb.canonicalise_eos(head_logits(teacher_hidden, teacher_head_weight), eos_ids)  # (n, V)
    if topk == 0:
        return ReverseKL.apply(student_logits, teacher_logits).sum()
    return trb.topk_reverse_kl(student_logits, teacher_logits, topk).sum()


class FusedChunkedKL(torch.autograd.Function):
    """
    The sum over n positions of _chunk_kl_sum, rows positions at a time, with the gradients of the student's hidden
    states (n, Hs) and head (V, Hs) made in the same pass: each chunk's logits, the teacher's included, are computed
    once, where activation checkpointing would compute them again in backward (100 of 280 GFLOP a step at Qwen3's
    vocabulary). The forward so holds the head's gradient, in the head's dtype, from the loss forward on; backward
    scales the kept gradients in place.
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, rows, topk, eos_ids):
        dtype = torch.promote_types(trb.compute_dtype(hs), trb.compute_dtype(ws))
        total = torch.zeros((), dtype=trb.compute_dtype(hs), device=hs.device)
        grad_hs = torch.empty_like(hs) if ctx.needs_input_grad[0] else None
        grad_ws = None
        for start in range(0, hs.shape[0], rows):
            chunk = slice(start, start + rows)
            with torch.enable_grad():
                logits = head_logits(hs[chunk].detach(), ws.detach()).requires_grad_()  # (n, V)
                kl = _logits_kl_sum(logits, ht[chunk], wt, topk, eos_ids)
                (grad,) = torch.autograd.grad(kl, logits)
            total += kl.detach()
            grad_chunk, grad_ws = head_grads(grad, hs[chunk], ws, dtype, grad_hs is not None, ctx.needs_input_grad[1],
                                             grad_ws)
            if grad_hs is not None:
                grad_hs[chunk] = grad_chunk
            del logits, kl, grad
        ctx.grads = grad_hs, grad_ws  # not saved tensors: backward scales them in place, once
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hs, grad_ws = ctx.grads
        del ctx.grads
        scaled = [None if g is None else g.mul_(grad.to(g.dtype)) for g in (grad_hs, grad_ws)]
        return *scaled, None, None, None, None, None


def chunk_rows(chunk_mib, vocab):
    """Positions per chunk of the chunked loss: as many float32 logit rows (V * 4 bytes each) as fit in chunk_mib MiB,
    and at least one (a single row over the budget is the least a chunk can hold)."""
    return max(1, int(chunk_mib * 2 ** 20) // (FP32_BYTES * vocab))


def chunked_opd_loss(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask,
                     chunk_mib=64.0, topk=0, eos_ids=()):
    """
    E1 from hidden states: equal in value and gradients to
        trb.opd_loss(student_hidden @ student_head_weight.T, teacher_hidden @ teacher_head_weight.T, mask, topk)
    without ever holding the (B, T, V) logits. Masked-in positions are gathered (n, H), processed chunk_rows(chunk_mib,
    V) at a time, so one chunk's float32 logits take at most chunk_mib MiB whatever V, T and B are; with gradients,
    each chunk's are made in the same pass (FusedChunkedKL), so peak extra memory is a few such buffers (memory_plan's
    LOSS_CHUNK_BUFFERS) and the student head's gradient. student_hidden (B, T, Hs), student_head_weight (V, Hs); the
    teacher's hidden size Ht may differ. eos_ids: with several, both models' logits are canonicalised
    (trb.canonicalise_eos) per chunk, as opd_loss's callers do to the logits they pass.
    """
    if mask.dtype != torch.bool or topk < 0 or not chunk_mib > 0:
        raise ValueError(f"need a bool mask, topk >= 0 and chunk_mib > 0, got {mask.dtype}, {topk}, {chunk_mib}")
    hs = student_hidden[mask]  # (n, Hs)
    ht = teacher_hidden[mask].detach()  # (n, Ht)
    rows = chunk_rows(chunk_mib, student_head_weight.shape[0])
    if torch.is_grad_enabled() and (hs.requires_grad or student_head_weight.requires_grad) and hs.shape[0]:
        total = FusedChunkedKL.apply(hs, student_head_weight, ht, teacher_head_weight.detach(), rows, topk,
                                     list(eos_ids))
    else:
        total = (hs.sum() * 0).to(trb.compute_dtype(hs))  # 0, with a grad_fn even when no position is masked in
        with torch.no_grad():
            for start in range(0, hs.shape[0], rows):
                chunk = slice(start, start + rows)
                total = total + _chunk_kl_sum(hs[chunk], student_head_weight, ht[chunk], teacher_head_weight, topk,
                                              list(eos_ids))
    return total / max(hs.shape[0], 1)


# -----------------------------------------------------------------------------
# The solver's buffers, kept between tokens.


class SolverBuffers:
    """
    trb.solve_beta's five (B, V) buffers, kept from one call to the next for one shape at a time, as a decode loop
    calls it (so one object must not be shared by threads). Allocated anew at every token, blocks this large are mapped
    and faulted in afresh by a fresh glibc process, and the solver's speed would depend on the allocator's history (2x
    apart on a CPU: docs/benchmarks.md). Inside a torch.compile trace the compiled solve plans its own.
    """

    def __init__(self):
        self.key, self.tensors = None, None

    def __call__(self, shape, dtype, device):
        if torch.compiler.is_compiling():
            return [torch.empty(shape, dtype=dtype, device=device) for _ in range(5)]
        key = (tuple(shape), dtype, device)
        if key != self.key:
            self.key, self.tensors = key, [torch.empty(shape, dtype=dtype, device=device) for _ in range(5)]
        return self.tensors


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


def padded_rows(rows):
    """Rows of a compiled decode call: the power of two at or above `rows` (the extra rows are done from the start)."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass
class Decoding:
    """
    trb.blended_generate's `decoding` (the interface trb.Decoding documents) with options that change its speed and
    memory, never its tokens (tested), and what they keep from one call to the next. Use one object for a whole run.
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
        self.solver_buffers = SolverBuffers()  # solve_beta's, kept through the run (the memory plan counts them)

    def rows(self, batch_rows):
        """Rows a call decodes: the batch's, or with compile the power of two at or above it."""
        return padded_rows(batch_rows) if self.compile else batch_rows

    def new_caches(self, models, rows, prompt_tokens, max_new_tokens):
        """(one KV cache per model, its length): trb.Decoding's DynamicCaches, or StaticCaches of
        static_cache_length(P, N) positions (with compile: the kept one, reset, while rows and length stay the same)."""
        if self.cache == "dynamic":
            return trb.Decoding.new_caches(self, models, rows, prompt_tokens, max_new_tokens)
        length = static_cache_length(prompt_tokens, max_new_tokens)
        if not self.compile:
            return [StaticCache(config=m.config, max_cache_len=length) for m in models], length
        caches = []
        for model in models:
            kept = self.kept.get(model)
            if kept is not None and kept[:2] == (rows, length):
                kept[2].reset()
            else:
                kept = self.kept[model] = (rows, length, StaticCache(config=model.config, max_cache_len=length))
            caches.append(kept[2])
        return caches, length

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
