"""
Tier 1: the maths of trb.py (E1-E5) against float64 brute force. Exact comparisons appear only where the code makes
the value exact on any CPU (a literal it sets, or the same ops on the same values); elsewhere the tolerance and its
reason are stated, since other SIMD paths (AVX2, AVX-512) round differently.
"""
import math

import pytest
import torch

import trb
from distill import fast

EPS_GRID = [1e-3, 1e-2, 0.1, 0.5]


# ----------------------------------------------------------------------------- float64 brute force, row by row


def ref_blend(s, t, beta):
    """log mu_beta for one row in float64, with the zero-probability rules spelled out token by token."""
    log_ps, log_pt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    if beta == 0:
        return log_ps
    w = torch.full_like(log_ps, -math.inf)
    for a in range(len(w)):
        if math.isfinite(log_ps[a]) and math.isfinite(log_pt[a]):
            w[a] = (1 - beta) * log_ps[a] + beta * log_pt[a]
    return w - torch.logsumexp(w, -1)


def ref_kl(log_p, log_q):
    """KL(p || q) for one row in float64 by a plain loop."""
    total = 0.0
    for a in range(len(log_p)):
        if log_p[a] > -math.inf:
            total += math.exp(log_p[a]) * float(log_p[a] - log_q[a])
    return total


def ref_realised_kl(s, t, beta):
    """KL(mu_beta || pi_S) for one row in float64, token by token."""
    return ref_kl(ref_blend(s, t, beta), torch.log_softmax(s.double(), -1))


def bisect64(s, t, eps):
    """The reference beta*: trb.solve_beta_bisect (E4 as the paper states it) on float64 copies of the logits."""
    eps = eps.double() if torch.is_tensor(eps) else eps
    return trb.solve_beta_bisect(s.double(), t.double(), eps, iters=60)


def logit_cases():
    """Random and adversarial (student, teacher) logit batches, (B, V) each."""
    g = torch.Generator().manual_seed(0)
    B, V = 6, 40
    cases = {"random": (torch.randn(B, V, generator=g) * 2, torch.randn(B, V, generator=g) * 2)}
    s, t = torch.randn(B, V, generator=g), torch.randn(B, V, generator=g) * 4
    cases["peaked_teacher"] = (s, t)
    s, t = torch.randn(B, V, generator=g) * 3, torch.randn(B, V, generator=g) * 3
    s[:, :5] = -math.inf  # student zeros
    t[:, 3:9] = -math.inf  # teacher zeros, overlapping the student's
    cases["neg_inf_both"] = (s, t)
    cases["thousands"] = (torch.randn(B, V, generator=g) * 1000 + 3000, torch.randn(B, V, generator=g) * 1000 - 2000)
    cases["large_offset_close"] = (torch.randn(B, V, generator=g) + 5000, torch.randn(B, V, generator=g) * 0.5 - 5000)
    s = torch.randn(B, V, generator=g) * 2
    cases["identical"] = (s, s.clone())
    return cases


# ----------------------------------------------------------------------------- E5


def test_kl_budget_schedule():
    """E5: linear decay from eps0 at step 0 to exactly 0.0 at and after K; None keeps eps0."""
    # Exact: Python floats (IEEE double, no SIMD); eps0 * (1 - 0), the literal 0.0 and float(eps0) are exact.
    assert trb.kl_budget(0, 0.02, 50) == 0.02
    assert trb.kl_budget(25, 0.02, 50) == pytest.approx(0.01)
    assert trb.kl_budget(50, 0.02, 50) == 0.0 and trb.kl_budget(500, 0.02, 50) == 0.0
    assert trb.kl_budget(10_000, 0.02, None) == 0.02
    with pytest.raises(ValueError):
        trb.kl_budget(0, -0.1, 50)


# ----------------------------------------------------------------------------- E4


@pytest.mark.parametrize("case", list(logit_cases()))
def test_solve_beta_bisect_is_feasible_and_tight_by_brute_force(case):
    """The reference bisection, in float64, is feasible and tight by the token-by-token float64 KL: KL(beta) <= eps and
    KL(beta + 1e-6) > eps unless beta = 1 (60 halvings bracket beta* to 1e-18, far inside 1e-6)."""
    s, t = logit_cases()[case]
    for eps in EPS_GRID:
        beta = bisect64(s, t, eps)
        for i in range(s.shape[0]):
            b = beta[i].item()
            assert ref_realised_kl(s[i], t[i], b) <= eps * (1 + 1e-9), (case, eps, i, b)
            assert b == 1.0 or ref_realised_kl(s[i], t[i], b + 1e-6) > eps, (case, eps, i, b)


def test_solve_beta_bisect_special_cases():
    """The reference bisection gives 0 at eps = 0 and for disjoint supports (also at eps = inf), 1 for identical models
    and at eps = inf; all are values it sets literally or reaches exactly (KL = 0 <= eps at every midpoint)."""
    s, t = logit_cases()["random"]
    assert bool((bisect64(s, t, 0.0) == 0).all()) and bool((bisect64(s, s, 0.01) == 1).all())
    assert bool((bisect64(s, t, math.inf) == 1).all())
    disjoint_s = torch.tensor([[0.0, 1.0, -math.inf, -math.inf]])
    disjoint_t = torch.tensor([[-math.inf, -math.inf, 2.0, 0.0]])
    for eps in (0.1, math.inf):
        assert bisect64(disjoint_s, disjoint_t, eps).item() == 0.0


@pytest.mark.parametrize("case", list(logit_cases()))
def test_solve_beta_matches_float64_bisection(case):
    """solve_beta (float32 Halley) agrees with the float64 bisection to 1e-3 in beta, or to 1e-3 relative in realised
    KL (the solver stops within 1e-4 of eps; float32 rounding of the KL is ~1e-5 relative)."""
    s, t = logit_cases()[case]
    for eps in EPS_GRID:
        beta, reference = trb.solve_beta(s, t, eps), bisect64(s, t, eps)
        for i in range(s.shape[0]):
            expected = reference[i].item()
            kl = ref_realised_kl(s[i], t[i], beta[i].item())
            close = abs(beta[i].item() - expected) <= 1e-3 or abs(kl - eps) <= 1e-3 * eps
            assert close, (case, eps, i, beta[i].item(), expected, kl)


@pytest.mark.parametrize("case", list(logit_cases()))
def test_solve_beta_feasible_and_tight(case):
    """The realised KL never exceeds eps by over 1e-3 relative, and beta is tight unless it is 1 (float64 brute force;
    1e-3 leaves 10x room over the solver's 1e-4 stopping tolerance and float32 rounding)."""
    s, t = logit_cases()[case]
    eps = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3])  # one budget per row, as a tensor
    beta, reference = trb.solve_beta(s, t, eps), bisect64(s, t, eps)
    assert beta.shape == s.shape[:-1] and bool(((beta >= 0) & (beta <= 1)).all())
    for i in range(s.shape[0]):
        e, b = eps[i].item(), beta[i].item()
        kl = ref_realised_kl(s[i], t[i], b)
        assert kl <= e * (1 + 1e-3), (case, i, b, kl, e)
        tight = b == 1.0 or kl >= e * (1 - 1e-3) or abs(b - reference[i].item()) <= 1e-3
        assert tight, (case, i, b, kl, e)


def test_solve_beta_feasible_at_qwen3_vocabulary():
    """At V = 151936 in float32 the realised KL (checked in float64) is within 1e-3 of eps, small eps included."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 151936, generator=g) * 3
    t = s + torch.randn(4, 151936, generator=g) * 2
    for eps in (1e-4, 1e-3, 0.02):
        beta = trb.solve_beta(s, t, eps)
        log_mu = trb.blend_logprobs(s.double(), t.double(), beta.double())
        kl = (log_mu.exp() * (log_mu - torch.log_softmax(s.double(), -1))).sum(-1)
        assert bool(((kl - eps).abs() <= 1e-3 * eps).all()), (eps, kl / eps)


def test_solve_beta_endpoints():
    """
    eps = 0 gives beta = 0 and mu = pi_S exactly, on any CPU: solve_beta returns zeros literally, and blend_logprobs
    returns log_softmax(student) itself for beta = 0 rows, the same op on the same values as the reference. eps >=
    KL(pi_T || pi_S) and eps = inf give beta = 1 exactly (the solver clamps to 1.0 and accepts it when KL(1) <= eps; the
    1e-3 margin is 100x the float32 KL error of the solver and of reverse_kl, and 10x the solver's 1e-4 stopping window,
    inside which it could otherwise accept a beta just below 1) and mu = pi_T within float32 rounding of a
    renormalisation (log-probs of size <= ~14, ulp 1e-6; 1.9e-6 measured).
    """
    s, t = logit_cases()["random"]
    beta0 = trb.solve_beta(s, t, 0.0)
    assert bool((beta0 == 0).all())
    assert torch.equal(trb.blend_logprobs(s, t, beta0), torch.log_softmax(s, -1))
    kl_teacher = trb.reverse_kl(t, s)  # KL(pi_T || pi_S) per row
    for eps in (kl_teacher * (1 + 1e-3), math.inf):
        beta1 = trb.solve_beta(s, t, eps)
        assert bool((beta1 == 1).all())
        torch.testing.assert_close(trb.blend_logprobs(s, t, beta1), torch.log_softmax(t, -1), atol=1e-5, rtol=0)


def test_solve_beta_small_budget_approximation():
    """For small eps, beta* ~ sqrt(2 eps / Var_{pi_S}[r]) to first order (float64)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 100, generator=g, dtype=torch.float64), torch.randn(8, 100, generator=g, dtype=torch.float64)
    log_ps, log_pt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    r = log_pt - log_ps
    ps = log_ps.exp()
    var = (ps * r * r).sum(-1) - (ps * r).sum(-1) ** 2
    for eps in (1e-6, 1e-8):
        beta = trb.solve_beta(s, t, eps)
        assert beta.dtype == torch.float64
        approx = torch.sqrt(2 * eps / var)
        torch.testing.assert_close(beta, approx, rtol=50 * approx.max().item(), atol=0)  # error is O(beta)


def test_solve_beta_special_inputs_are_finite():
    """bf16 input, rows with disjoint supports, and all-identical models give finite betas with the right values. bf16
    logits are solved in float32, so they equal the solve of the same values cast first (same ops, same values); the
    disjoint (0) and identical (1) cases are values the solver sets literally."""
    s, t = logit_cases()["random"]
    beta_bf16 = trb.solve_beta(s.bfloat16(), t.bfloat16(), 0.05)
    assert beta_bf16.dtype == torch.float32 and bool(torch.isfinite(beta_bf16).all())
    assert torch.equal(beta_bf16, trb.solve_beta(s.bfloat16().float(), t.bfloat16().float(), 0.05))
    disjoint_s = torch.tensor([[0.0, 1.0, -math.inf, -math.inf]])
    disjoint_t = torch.tensor([[-math.inf, -math.inf, 2.0, 0.0]])
    for eps in (0.1, math.inf):
        assert trb.solve_beta(disjoint_s, disjoint_t, eps).item() == 0.0
    assert bool(torch.isfinite(trb.blend_logprobs(disjoint_s, disjoint_t, 1.0)).any())
    same = trb.solve_beta(s, s, 0.01)
    assert bool((same == 1).all())


def test_solve_beta_rejects_bad_eps():
    """A negative or NaN budget is an error, not a silent clamp."""
    s, t = logit_cases()["random"]
    for eps in (-0.1, math.nan):
        with pytest.raises(ValueError):
            trb.solve_beta(s, t, eps)


# ----------------------------------------------------------------------------- E3


@pytest.mark.parametrize("case", list(logit_cases()))
def test_blend_logprobs_normalised_and_exact(case):
    """blend_logprobs is a normalised log-distribution, never NaN, equal to the float64 token-by-token blend."""
    s, t = logit_cases()[case]
    for beta in (0.0, 0.3, 1.0):
        out = trb.blend_logprobs(s, t, beta)
        assert not bool(out.isnan().any())
        # float32 log_softmax, then logsumexp over V = 40: a few ulp of 1 (2.4e-7 measured).
        torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(s.shape[0]), atol=1e-5, rtol=0)
        for i in range(s.shape[0]):  # float32 vs float64: ~1e-7 absolute, ~2e-6 relative measured
            torch.testing.assert_close(out[i].double().exp(), ref_blend(s[i], t[i], beta).exp(), atol=1e-5, rtol=1e-4)


def test_blend_zero_probability_rules():
    """Student zeros stay zero for every beta; teacher zeros are zero for beta > 0 and kept at beta = 0."""
    # Exact: -inf is set by masked_fill (or is the student's own logit) and stays -inf through addcmul and log_softmax.
    s = torch.tensor([[0.0, 1.0, -math.inf, 0.5]])
    t = torch.tensor([[1.0, -math.inf, 2.0, 0.0]])
    assert trb.blend_logprobs(s, t, 0.0)[0, 1] > -math.inf
    for beta in (0.0, 1e-3, 0.5, 1.0):
        out = trb.blend_logprobs(s, t, beta)
        assert out[0, 2] == -math.inf
        if beta > 0:
            assert out[0, 1] == -math.inf


# ----------------------------------------------------------------------------- E1


def test_reverse_kl_equals_direct_formula():
    """reverse_kl equals sum_a p_S (log p_S - log p_T) computed by a float64 loop, including -inf logits."""
    for case, (s, t) in logit_cases().items():
        if case == "neg_inf_both":
            t = t.masked_fill(torch.isinf(s), -math.inf)  # keep the KL finite: teacher zeros only at student zeros
            s = s.masked_fill(torch.isinf(t), -math.inf)
        kl = trb.reverse_kl(s, t)
        for i in range(s.shape[0]):
            expected = ref_kl(torch.log_softmax(s[i].double(), -1), torch.log_softmax(t[i].double(), -1))
            assert kl[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-5), case  # float32 vs float64
    s, _ = logit_cases()["random"]
    # Exact: both sides are the same log_softmax of the same values, so every log p_S - log p_T is 0.
    assert torch.equal(trb.reverse_kl(s, s), torch.zeros(s.shape[0]))


def test_opd_loss_gradient_matches_float64_reference():
    """opd_loss and its student gradient equal autograd of a float64 reference; the teacher gets no gradient."""
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(3, 5, 30, generator=g) * 2).requires_grad_()
    t = (torch.randn(3, 5, 30, generator=g) * 2).requires_grad_()
    mask = torch.rand(3, 5, generator=g) > 0.4
    loss = trb.opd_loss(s, t, mask)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    log_ps, log_pt = torch.log_softmax(s64, -1), torch.log_softmax(t.detach().double(), -1)
    per_pos = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    expected = (per_pos * mask).sum() / mask.sum()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # float32 vs float64: 1e-7 relative measured
    # float32 vs float64: a few ulp of the largest entries (|grad| <= 0.15); the tolerance is 50x the error measured.
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-7, rtol=1e-4)
    assert t.grad is None


def test_opd_loss_no_gradient_leaks_into_masked_positions():
    """Masked-out positions get exactly zero gradient, even when their logits are inf/NaN; an empty mask gives 0."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 16, generator=g)
    t = torch.randn(2, 4, 16, generator=g)
    s[0, 1] = math.nan
    t[1, 2, :3] = -math.inf
    s = s.requires_grad_()
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    trb.opd_loss(s, t, mask).backward()
    assert bool(torch.isfinite(s.grad).all())
    # Exact: s[mask] scatters its gradient into zeros; an empty mask's loss is a sum over no positions, divided by 1.
    assert bool((s.grad[~mask] == 0).all()) and bool((s.grad[mask].abs().sum(-1) > 0).all())
    empty = trb.opd_loss(s, t, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()


def test_opd_loss_gradient_descends():
    """A small step along -grad lowers the loss (the gradient points the right way)."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 20, generator=g).requires_grad_()
    t = torch.randn(4, 20, generator=g)
    mask = torch.ones(4, dtype=torch.bool)
    loss = trb.opd_loss(s, t, mask)
    loss.backward()
    assert trb.opd_loss(s.detach() - 0.1 * s.grad, t, mask) < loss


def test_topk_equal_to_vocab_is_exact():
    """topk >= V equals the exact loss; a smaller topk is the KL of the renormalised student to the teacher."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 12, generator=g), torch.randn(2, 3, 12, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    exact = trb.opd_loss(s, t, mask)
    # Exact: topk >= V calls reverse_kl itself, the same ops on the same values as topk = 0.
    assert trb.opd_loss(s, t, mask, topk=12).item() == exact.item()
    assert trb.opd_loss(s, t, mask, topk=50).item() == exact.item()
    k = 4
    index = s.topk(k, -1).indices
    log_q = torch.log_softmax(s.gather(-1, index).double(), -1)
    log_pt = torch.log_softmax(t.double(), -1).gather(-1, index)
    expected = (log_q.exp() * (log_q - log_pt)).sum(-1).mean()
    assert trb.opd_loss(s, t, mask, topk=k).item() == pytest.approx(expected.item(), rel=1e-5)  # float32 vs float64


def rows_mib(rows, V):
    """The byte budget (MiB) of exactly `rows` float32 logit rows of width V."""
    return rows * V * 4 / 2 ** 20


@pytest.mark.parametrize("V, mib, rows", [(151936, 64, 110), (151936, 0.25, 1), (262144, 1, 1),
                                          (33, rows_mib(4, 33), 4), (248320, 64, 67), (32000, 593.5, 4861)])
def test_chunk_rows_keep_one_chunks_float32_logits_within_the_budget(V, mib, rows):
    """chunk_rows: the most float32 logit rows of width V within mib MiB, and one where a single row is over it."""
    assert fast.chunk_rows(mib, V) == rows
    assert rows * V * 4 <= mib * 2 ** 20 or rows == 1
    assert (rows + 1) * V * 4 > mib * 2 ** 20


@pytest.mark.parametrize("B, T, V, mib", [(1, 40, 151936, 2.0), (3, 17, 5000, 0.05), (2, 9, 7, 1e-5)])
def test_chunked_opd_loss_holds_at_most_the_budget_of_logits_at_once(monkeypatch, B, T, V, mib):
    """Whatever the batch, length and vocabulary, every chunk chunked_opd_loss computes holds at most mib MiB of
    float32 logits (one row where a row alone is over it), and the chunks cover every masked-in position once."""
    seen = []
    chunk_kl_sum = fast._chunk_kl_sum
    monkeypatch.setattr(fast, "_chunk_kl_sum", lambda hs, *rest: seen.append(hs.shape[0]) or chunk_kl_sum(hs, *rest))
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, T, generator=g) > 0.2
    with torch.no_grad():
        fast.chunked_opd_loss(torch.randn(B, T, 4, generator=g), torch.randn(V, 4, generator=g),
                              torch.randn(B, T, 3, generator=g), torch.randn(V, 3, generator=g), mask, chunk_mib=mib)
    assert sum(seen) == int(mask.sum()) and len(seen) > 1
    assert all(n * V * 4 <= mib * 2 ** 20 or n == 1 for n in seen)


@pytest.mark.parametrize("topk", [0, 5])
def test_chunked_opd_loss_equals_dense(topk):
    """chunked_opd_loss equals opd_loss on materialised logits in value and all gradients, chunk not dividing n."""
    g = torch.Generator().manual_seed(6)
    B, T, Hs, Ht, V = 2, 7, 8, 12, 33
    hs = torch.randn(B, T, Hs, generator=g, requires_grad=True)
    ws = torch.randn(V, Hs, generator=g, requires_grad=True)
    ht, wt = torch.randn(B, T, Ht, generator=g), torch.randn(V, Ht, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3  # n masked-in positions, not a multiple of the chunk size
    assert mask.sum() % 4 != 0
    dense = trb.opd_loss(hs @ ws.T, ht @ wt.T, mask, topk=topk)
    dense_grads = torch.autograd.grad(dense, (hs, ws))
    chunked = fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(4, V), topk=topk)
    chunked_grads = torch.autograd.grad(chunked, (hs, ws))
    # float32, other op order (matmul shapes, chunked sums, the analytic gradient pi_S (d - KL) with d ~ 10): a few ulp
    # of O(1) values, up to 4.5e-7 measured on entries near 0, so atol 1e-5 (1e-6 left only a 3.7x margin).
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, dense, **close)
    for got, want in zip(chunked_grads, dense_grads):
        torch.testing.assert_close(got, want, **close)
    with torch.no_grad():
        torch.testing.assert_close(fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(3, V), topk=topk),
                                   dense, **close)


def test_chunked_opd_loss_computes_each_chunks_logits_once(monkeypatch):
    """With gradients, forward and backward together project each chunk through each head once (FusedChunkedKL makes
    the gradients in the forward pass; checkpointing would project both heads again in backward), and backward()
    leaves the same gradients as a second, separate forward and backward."""
    calls = []
    head_logits = fast.head_logits
    monkeypatch.setattr(fast, "head_logits", lambda h, w: calls.append(h.shape[0]) or head_logits(h, w))
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    ws = torch.randn(40, 8, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 9, 6, generator=g), torch.randn(40, 6, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(5, 40)).backward()
    assert calls == [5, 5, 5, 5, 5, 5, 3, 3]  # 18 positions: chunks of 5, 5, 5, 3, each through both heads once
    first = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    (3 * fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(5, 40))).backward()  # backward scales
    torch.testing.assert_close(hs.grad, 3 * first[0])
    torch.testing.assert_close(ws.grad, 3 * first[1])


def test_chunked_opd_loss_canonicalises_eos():
    """With several EOS ids, chunked_opd_loss equals opd_loss on canonicalised logits, in value and gradients."""
    g = torch.Generator().manual_seed(8)
    hs = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    ws = torch.randn(20, 8, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 5, 6, generator=g), torch.randn(20, 6, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    eos = [3, 17]
    dense = trb.opd_loss(trb.canonicalise_eos(hs @ ws.T, eos), trb.canonicalise_eos(ht @ wt.T, eos), mask)
    chunked = fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(3, 20), eos_ids=eos)
    close = dict(rtol=1e-5, atol=1e-5)  # float32, other op order over V=20: as in test_chunked_opd_loss_equals_dense
    torch.testing.assert_close(chunked, dense, **close)
    for got, want in zip(torch.autograd.grad(chunked, (hs, ws)), torch.autograd.grad(dense, (hs, ws))):
        torch.testing.assert_close(got, want, **close)
    assert not torch.allclose(chunked, fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(3, 20)))


def test_chunked_opd_loss_of_an_empty_mask_is_zero_and_differentiable():
    """No masked-in position: the loss is exactly 0 and backward() runs (as opd_loss's does): zero gradient for the
    hidden states, none for the head, which takes no part."""
    hs = torch.randn(2, 3, 8, requires_grad=True)
    ws = torch.randn(10, 8, requires_grad=True)
    loss = fast.chunked_opd_loss(hs, ws, torch.randn(2, 3, 6), torch.randn(10, 6), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert bool((hs.grad == 0).all()) and ws.grad is None


def test_chunked_loss_computes_logits_in_float32_under_autocast():
    """Under bf16 autocast each chunk's logits are still float32: the loss and its gradient equal opd_loss on float32
    logits. A bf16 head matmul would round logits of magnitude ~30 by ~0.1 and miss by far more than the bound."""
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 48, generator=g)
    ws, wt = torch.randn(500, 64, generator=g) * 0.7, torch.randn(500, 48, generator=g) * 0.8  # logits ~ +-30
    hs.requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    reference = trb.opd_loss(hs @ ws.T, ht @ wt.T, mask)
    (expected,) = torch.autograd.grad(reference, hs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(5, 500))
    (grad,) = torch.autograd.grad(loss, hs)
    assert abs(loss.item() - reference.item()) <= 1e-5 * reference.item()
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_chunked_loss_with_bf16_heads_matches_float32_and_never_casts_a_whole_head(monkeypatch):
    """bf16 heads (FSDP's mixed-precision student, any teacher): the loss and its gradients equal opd_loss on logits
    from the heads cast to float32 (gradients to within one bf16 rounding), with the heads cast a few rows at a time
    (blocks not dividing V), and no allocation is ever half as large as a float32 copy of the teacher's head."""
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(4)
    V, Hs, Ht = 300, 16, 24
    hs = torch.randn(2, 7, Hs, generator=g).to(torch.bfloat16).requires_grad_(True)
    ws = (torch.randn(V, Hs, generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
    ht, wt = torch.randn(2, 7, Ht, generator=g).to(torch.bfloat16), torch.randn(V, Ht, generator=g).to(torch.bfloat16)
    mask = torch.rand(2, 7, generator=g) > 0.2
    reference = trb.opd_loss(hs.float() @ ws.float().T, ht.float() @ wt.float().T, mask)
    expected = torch.autograd.grad(reference, (hs, ws))
    monkeypatch.setattr(fast, "HEAD_BLOCK_ROWS", 64)
    loss = fast.chunked_opd_loss(hs, ws, ht, wt, mask, chunk_mib=rows_mib(4, V))
    grads = torch.autograd.grad(loss, (hs, ws))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):  # float32 sums in another order, each rounded once to bf16: 1 ulp apart
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -8 * float(want.abs().max()))
    big = torch.randn(20000, 64).to(torch.bfloat16)  # the teacher's head: 5 MB as float32
    student = torch.randn(1, 8, 16, requires_grad=True), torch.randn(20000, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fast.chunked_opd_loss(*student, torch.randn(1, 8, 64).to(torch.bfloat16), big,
                             torch.ones(1, 8, dtype=torch.bool)).backward()
    largest = max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert largest < big.numel() * 4 / 2, largest


def test_solver_workspace_is_not_aliased_between_calls():
    """solve_beta reuses its (B, V) buffers from call to call: a result never changes when a later call overwrites
    them, and calls on another shape in between change nothing (the same ops on the same values: exact)."""
    g = torch.Generator().manual_seed(3)
    s1, t1, s2, t2 = (torch.randn(4, 300, generator=g) * 3 for _ in range(4))
    first = trb.solve_beta(s1, t1, 0.05)
    kept = first.clone()
    second = trb.solve_beta(s2, t2, 0.05)
    trb.solve_beta(torch.randn(2, 50, generator=g), torch.randn(2, 50, generator=g), 0.05)  # another shape
    assert torch.equal(first, kept) and torch.equal(trb.solve_beta(s1, t1, 0.05), kept)
    assert torch.equal(trb.solve_beta(s2, t2, 0.05), second) and not torch.equal(first, second)
