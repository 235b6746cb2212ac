"""
The fast decode path against the plain one: the token rule with no host read (what a torch.compile trace of it runs)
equals the eager rule with its shortcuts and traces whole; the eager rule's op count per token is pinned; static KV
caches and the compiled per-token step give the tokens of the dynamic, eager path, for any number of call shapes.
"""
import math
import warnings

import pytest
import torch

import trb
from distill import fast
from test_math import bisect64, logit_cases
from test_sampler import PAD, left_padded_prompts, tiny_qwen3

EPS_ROWS = torch.tensor([0.0, math.inf, 1e-3, 1e-2, 0.1, 0.5])  # one budget per row of a logit case, 0 and inf included


@pytest.fixture
def no_free_reads(monkeypatch):
    """Run the token rule as inside a torch.compile trace: every iteration, both forms of the blend, no reads."""
    monkeypatch.setattr(trb, "may_read", lambda x: False)


@pytest.mark.parametrize("case", list(logit_cases()))
def test_sync_free_token_rule_equals_the_cpu_shortcuts(case, monkeypatch):
    """
    Without reads of tensor values the solver runs all max_iter iterations (rows that are done keep their beta_star)
    and evaluates both forms of the blend per row; where it may read, the eager solver skips that work (blend_logprobs
    builds its pure-student fallback either way). The results are equal exactly: the skipped work changes no returned
    value, and what is returned is the same ops on the same values.
    """
    s, t = logit_cases()[case]
    cpu = trb.solve_beta(s, t, EPS_ROWS), trb.solve_beta(s, t, 0.02)
    blended = trb.blend_logprobs(s, t, cpu[0])
    monkeypatch.setattr(trb, "may_read", lambda x: False)
    assert torch.equal(trb.solve_beta(s, t, EPS_ROWS), cpu[0]) and torch.equal(trb.solve_beta(s, t, 0.02), cpu[1])
    assert torch.equal(trb.blend_logprobs(s, t, cpu[0]), blended)


def test_sync_free_solver_stays_within_the_float64_bisection(no_free_reads):
    """The fixed-iteration path keeps the solver's accuracy: beta within 1e-3 of the float64 bisection, or the
    realised KL within 1e-3 of eps (as tests/test_math.py asks of the CPU path)."""
    for case, (s, t) in logit_cases().items():
        for eps in (1e-3, 0.02, 0.5):
            beta, reference = trb.solve_beta(s, t, eps), bisect64(s, t, eps)
            log_mu = trb.blend_logprobs(s.double(), t.double(), beta.double())
            kl = trb._kl(log_mu, torch.log_softmax(s.double(), -1))
            close = ((beta.double() - reference).abs() <= 1e-3) | ((kl - eps).abs() <= 1e-3 * eps)
            assert bool(close.all()), (case, eps, beta, reference)


def test_bad_tensor_eps_is_nan_without_free_reads(no_free_reads):
    """A negative or NaN budget cannot raise without a host sync; the rows get beta NaN instead of a silent clamp."""
    s, t = logit_cases()["random"]
    beta = trb.solve_beta(s, t, torch.tensor([0.1, -0.1, math.nan, 0.1, 0.0, math.inf]))
    assert bool(beta[1:3].isnan().all()) and bool(torch.isfinite(beta[[0, 3, 4, 5]]).all())


def test_compiled_solver_and_blend_trace_whole_and_equal_eager():
    """
    torch.compile(fullgraph=True) traces solve_beta and blend_logprobs without a graph break (fullgraph raises at
    one), for a tensor eps holding 0 and inf and logits holding -inf. Results equal eager to 1e-5: inductor fuses the
    (B, V) reductions in another order, a float32 rounding difference (~1e-7 measured). Three solver iterations keep
    the compile short (every iteration is the same code, unrolled); eager runs the same three.
    """
    torch._dynamo.reset()
    s, t = logit_cases()["neg_inf_both"]
    solve = torch.compile(lambda s, t, eps: trb.solve_beta(s, t, eps, max_iter=3), fullgraph=True)
    blend = torch.compile(trb.blend_logprobs, fullgraph=True)
    beta = solve(s, t, EPS_ROWS)
    eager = trb.solve_beta(s, t, EPS_ROWS, max_iter=3)
    torch.testing.assert_close(beta, eager, atol=1e-5, rtol=0)
    assert beta[0] == 0 and beta[1] == 1  # eps = 0 and eps = inf: literal values
    log_mu, eager_mu = blend(s, t, eager), trb.blend_logprobs(s, t, eager)
    assert torch.equal(log_mu == -math.inf, eager_mu == -math.inf)  # the zero-probability rules, exactly
    torch.testing.assert_close(log_mu, eager_mu, atol=1e-5, rtol=0)


def rollout_pair(**kwargs):
    """The same left-padded, EOS-stopping batch decoded by two tiny Qwen3 models with the given trb.Decoding."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2, layers=3)
    ids, mask = left_padded_prompts()

    def decode(decoding=None):
        return trb.blended_generate(student, teacher, ids, mask, max_new_tokens=16, eos_token_id=[1, 2, 3, 4],
                                    pad_token_id=PAD, generator=torch.Generator().manual_seed(0), decoding=decoding,
                                    **kwargs)
    return decode


def assert_same_rollout(a, b):
    """Same tokens and masks; float fields within 1e-5 (attention over a longer, masked cache rounds differently)."""
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.completion_mask, b.completion_mask)
    for name in ("beta", "behavior_logprobs", "teacher_logprobs", "realised_kl"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_equals_dynamic_cache(temperature):
    """cache='static' (one preallocated StaticCache per model) decodes the tokens of the dynamic cache, greedy and
    with a seeded sampler, on left-padded rows that stop at EOS at different steps."""
    decode = rollout_pair(eps=0.05, temperature=temperature)
    dynamic, static = decode(), decode(fast.Decoding(cache="static"))
    assert_same_rollout(static, dynamic)
    assert dynamic.completion_mask[:, -1].sum() < dynamic.completion_mask[:, 0].sum()  # some rows stopped at EOS


def test_compiled_step_equals_eager():
    """compile=True (both forwards in one torch.compile'd step, rows padded to a power of two) gives the eager tokens
    with a seeded sampler on CPU, also on a second call, which resets and reuses the kept static caches."""
    torch._dynamo.reset()
    decode = rollout_pair(eps=0.05, temperature=1.0)
    eager = decode(fast.Decoding(cache="static"))
    compiled = fast.Decoding(cache="static", compile=True)
    assert_same_rollout(decode(compiled), eager)
    assert_same_rollout(decode(compiled), eager)
    with pytest.raises(ValueError):
        fast.Decoding(compile=True)  # a growing cache cannot be compiled


def test_compiled_decode_runs_any_number_of_call_shapes():
    """Ten compiled calls with different row counts and prompt lengths all run without a recompile-limit error
    (dynamo stops after 8 shapes of one function): rows are padded to a power of two and caches to a few lengths, so
    the step sees 4 shapes here. Each call's rollout equals the eager one. The "eager" backend keeps the guards and
    the limit of a real compile without its code generation."""
    torch._dynamo.reset()
    student, teacher = tiny_qwen3(1), tiny_qwen3(2, layers=3)
    g = torch.Generator().manual_seed(0)
    compiled, static = (fast.Decoding(cache="static", compile=c, compile_backend="eager") for c in (True, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager decoding would warn
        for rows, prompt in zip(range(1, 11), (3, 9, 4, 12, 5, 7, 2, 11, 6, 8)):
            ids = torch.randint(5, 30, (rows, prompt), generator=g)
            mask = torch.ones_like(ids)
            mask[0, :prompt // 2] = 0  # one left-padded row
            decode = lambda decoding: trb.blended_generate(
                student, teacher, ids, mask, eps=0.05, max_new_tokens=6, eos_token_id=[1, 2], pad_token_id=PAD,
                temperature=1.0, generator=torch.Generator().manual_seed(rows), decoding=decoding)
            assert_same_rollout(decode(compiled), decode(static))
    assert not compiled.failed


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    """If a compile fails all the same (here: a recompile limit of 1 and a second shape), decoding goes on eagerly
    with one warning, and the rollout is the eager one; later calls do not try again."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    student, teacher = tiny_qwen3(1), tiny_qwen3(2, layers=3)
    ids, mask = left_padded_prompts()
    compiled, static = (fast.Decoding(cache="static", compile=c, compile_backend="eager") for c in (True, False))
    decode = lambda rows, decoding: trb.blended_generate(
        student, teacher, ids[:rows], mask[:rows], eps=0.05, max_new_tokens=6, eos_token_id=[1, 2], pad_token_id=PAD,
        temperature=1.0, generator=torch.Generator().manual_seed(0), decoding=decoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_rollout(decode(4, compiled), decode(4, static))
        assert not caught
        for rows in (2, 1):  # new shapes: the first one's recompile fails, the second is not compiled at all
            assert_same_rollout(decode(rows, compiled), decode(rows, static))
    assert len([w for w in caught if "decoding goes on eagerly" in str(w.message)]) == 1
    assert compiled.failed
