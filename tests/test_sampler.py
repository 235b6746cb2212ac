"""Tier 2: blended_generate on tiny random Hugging Face models (cached vs uncached, vs model.generate)."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from tokenizers import Tokenizer, models

import trb
from distill import evaluation, fast
from distill.models import check_same_vocab

VOCAB, PAD = 96, 0


def tiny_qwen3(seed, layers=2, vocab=VOCAB, hidden=32):
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         pad_token_id=PAD, tie_word_embeddings=False, initializer_range=0.3)
    return Qwen3ForCausalLM(config).eval()


def tiny_llama(seed, layers=2, vocab=VOCAB):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
                         initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def left_padded_prompts(B=5, P=7, seed=0):
    """A (B, P) prompt batch with different left-padding per row, as a tokenizer with padding_side='left' gives."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for row, pad in enumerate([0, 2, 4, 1, 3][:B]):
        ids[row, :pad], mask[row, :pad] = PAD, 0
    return ids, mask


def early_eos(model, ids, mask, step=2):
    """A token that greedy decoding emits at `step` in row 0, so that row stops early when it is the EOS."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=step + 1, pad_token_id=PAD)
    return int(out[0, ids.shape[1] + step])


def assert_same_greedy_tokens(got, expected, model, prompt_mask, tie=1e-4):
    """
    Two greedy decodes of `model` agree token for token, except where the model's top two logits tie within `tie`:
    two code paths computing the same logits may differ by an ulp on another CPU, and an argmax can flip only at such
    a near-tie. So each row must match up to its first difference, and there both tokens must be within `tie` of the
    top logit of the shared prefix (one uncached forward), i.e. the two top tokens of a near-tie; any other token, even
    at a near-tie, fails. tie = 1e-4 is 20x the cached-vs-uncached logit difference of these models (5e-6 measured).
    Returns the number of rows that diverged.
    """
    P, n = prompt_mask.shape[1], min(got.shape[1], expected.shape[1])
    diverged = 0
    for row in range(got.shape[0]):
        differ = (got[row, :n] != expected[row, :n]).nonzero()
        if len(differ) == 0:
            continue
        j = int(differ[0])
        assert j >= P, f"row {row}: the prompt itself differs at {j}"
        mask = torch.cat([prompt_mask[row:row + 1], torch.ones(1, j - P, dtype=prompt_mask.dtype)], dim=1)
        with torch.no_grad():
            logits = model(input_ids=expected[row:row + 1, :j], attention_mask=mask,
                           position_ids=trb.position_ids(mask)).logits[0, -1]
        logits = logits.float()  # (V,)
        below_top = logits.max() - logits[torch.stack([got[row, j], expected[row, j]])]  # (2,) both tokens' distances
        assert bool((below_top <= tie).all()), f"row {row} differs at position {j}: {below_top.tolist()} below the top"
        diverged += 1
    assert got.shape == expected.shape or diverged, (got.shape, expected.shape)
    return diverged


def uncached_recompute(student, teacher, rollout, prompt_mask, eps, temperature):
    """beta and log mu(token) from one full forward of both models over the final sequences, then the solve."""
    P, N = prompt_mask.shape[1], rollout.completion_mask.shape[1]
    mask = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], N, dtype=prompt_mask.dtype)], dim=1)
    kwargs = dict(input_ids=rollout.sequences, attention_mask=mask, position_ids=trb.position_ids(mask))
    with torch.no_grad():
        s = student(**kwargs).logits[:, P - 1:P - 1 + N].float() / temperature  # (B, N, V)
        t = teacher(**kwargs).logits[:, P - 1:P - 1 + N].float() / temperature
    beta = trb.solve_beta(s, t, eps)
    log_mu = trb.blend_logprobs(s, t, beta)
    tokens = rollout.sequences[:, P:]
    return beta, log_mu.gather(-1, tokens[..., None]).squeeze(-1), s, t


@pytest.mark.parametrize("make", [tiny_qwen3, tiny_llama])
def test_greedy_eps0_equals_student_generate(make):
    """Greedy at eps = 0 equals student.generate(do_sample=False) token for token (up to near-ties of two logits, see
    assert_same_greedy_tokens), some rows stopping at EOS early."""
    student = make(1)
    ids, mask = left_padded_prompts()
    eos = early_eos(student, ids, mask)
    expected = student.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                                pad_token_id=PAD)
    rollout = trb.blended_generate(student, None, ids, mask, eps=0.0, max_new_tokens=12, temperature=0.0,
                                   eos_token_id=eos, pad_token_id=PAD)
    assert_same_greedy_tokens(rollout.sequences, expected, student, mask)
    assert not bool(rollout.completion_mask.all())  # the EOS really did stop a row early


def test_greedy_eps_inf_equals_teacher_generate():
    """Greedy at eps = inf equals teacher.generate(do_sample=False) on the same left-padded batch (up to near-ties);
    beta = 1 exactly, the value the solver sets for eps = inf."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2, layers=3)
    ids, mask = left_padded_prompts()
    eos = early_eos(teacher, ids, mask)
    expected = teacher.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                                pad_token_id=PAD)
    rollout = trb.blended_generate(student, teacher, ids, mask, eps=math.inf, max_new_tokens=12, temperature=0.0,
                                   eos_token_id=eos, pad_token_id=PAD)
    assert_same_greedy_tokens(rollout.sequences, expected, teacher, mask)
    assert bool((rollout.beta[rollout.completion_mask] == 1).all())


def test_cached_blend_equals_uncached_recomputation():
    """At 0 < eps < inf and tau != 1, every beta and behavior log-prob equals a full uncached forward, then solve."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2, layers=3)
    ids, mask = left_padded_prompts()
    eps, tau = 0.05, 0.7
    rollout = trb.blended_generate(student, teacher, ids, mask, eps=eps, max_new_tokens=10, temperature=tau,
                                   generator=torch.Generator().manual_seed(0))
    beta, log_mu, s, t = uncached_recompute(student, teacher, rollout, mask, eps, tau)
    m = rollout.completion_mask
    assert bool(((rollout.beta[m] > 0) & (rollout.beta[m] < 1)).all())  # the budget binds: a real blend
    # Cached and uncached logits differ by ~5e-6 (other attention shapes); each solve stops within 1e-4 relative of eps
    # in KL (~5e-5 in beta), so 1e-4 bounds both; 2e-7 (beta), 4e-6 (log-probs) measured.
    torch.testing.assert_close(rollout.beta[m], beta[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollout.behavior_logprobs[m], log_mu[m], atol=1e-4, rtol=1e-4)
    tokens = rollout.sequences[:, ids.shape[1]:]
    log_pt = torch.log_softmax(t, -1)
    torch.testing.assert_close(rollout.teacher_logprobs[m], log_pt.gather(-1, tokens[..., None]).squeeze(-1)[m],
                               atol=1e-4, rtol=1e-4)
    assert bool((rollout.realised_kl[m] <= eps * (1 + 1e-3)).all())


def test_eos_and_padding_masks():
    """completion_mask is true up to and including each row's first EOS; only pad_token_id follows it."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2)
    ids, mask = left_padded_prompts()
    eos = early_eos(student, ids, mask, step=1)
    rollout = trb.blended_generate(student, teacher, ids, mask, eps=0.01, max_new_tokens=15, eos_token_id=[eos],
                                   pad_token_id=PAD, generator=torch.Generator().manual_seed(3), temperature=0.0)
    assert torch.equal(rollout.sequences[:, :ids.shape[1]], ids)  # the prompt exactly as given (copied by torch.cat)
    tokens = rollout.sequences[:, ids.shape[1]:]
    stopped = 0
    for row in range(ids.shape[0]):
        hits = (tokens[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else tokens.shape[1]
        stopped += bool(len(hits))
        assert bool(rollout.completion_mask[row, :end].all()) and not bool(rollout.completion_mask[row, end:].any())
        assert bool((tokens[row, end:] == PAD).all())
    assert stopped >= 1


def test_seeded_determinism():
    """The same generator seed gives the same rollout, bitwise (the same ops on the same values in one process);
    another seed gives another."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2)
    ids, mask = left_padded_prompts()

    def run(seed):
        return trb.blended_generate(student, teacher, ids, mask, eps=0.02, max_new_tokens=12,
                                    generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.beta, b.beta)
    assert not torch.equal(a.sequences, c.sequences)


# The 0.999 quantile of the chi-square distribution with 10 degrees of freedom (tables; scipy is not a dependency).
CHI2_10_999 = 29.588


def test_inverse_cdf_draw_matches_the_probabilities():
    """trb._sample's draw from one uniform per row: 200,000 draws over 12 tokens (one at -inf, one of probability
    1e-3) pass a chi-square test against the probabilities at the 0.001 level (fixed seed), and the -inf token is
    never drawn. The draw is exact, so a wrong rule (say, an off-by-one in the search) fails by far."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=g) * 2
    logits[4], logits[7] = -math.inf, logits.logsumexp(0) + math.log(1e-3)
    log_p = torch.log_softmax(logits, 0)
    n = 200_000
    u = torch.rand(n, dtype=torch.float64, generator=g)
    tokens = trb._sample(log_p.expand(n, -1), u)
    counts = torch.bincount(tokens, minlength=12).double()
    expected = log_p.double().exp() * n
    assert counts[4] == 0
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < CHI2_10_999, chi2
    shifted = trb._sample(log_p.expand(n, -1), (u + 1 / 12) % 1)  # a draw with the wrong uniforms: far off
    assert chi2 < float(((torch.bincount(tokens, minlength=12) - torch.bincount(shifted, minlength=12)) ** 2).sum())


def test_inverse_cdf_draw_keeps_the_tail_and_never_draws_a_zero():
    """float64 sums keep a token of probability 1e-12 after half the mass (float32 sums would lose it); u at 0 and
    just below 1 give the first and last tokens of nonzero probability, with zeros before, between and after."""
    p = torch.tensor([0.0, 0.5, 1e-12, 0.0, 0.5 - 1e-12, 0.0, 0.0], dtype=torch.float64)
    log_p = p.log().float().expand(4, -1)
    cdf = log_p[0].double().exp().cumsum(0)  # the float32 log-probabilities' own sums: token 2's interval is ~1e-12
    assert cdf[2] - cdf[1] < 2e-12 and cdf[1].float() == cdf[2].float()
    u = torch.tensor([0.0, float((cdf[1] + cdf[2]) / 2 / cdf[-1]), 0.75, 1 - 2 ** -53], dtype=torch.float64)
    assert trb._sample(log_p, u).tolist() == [1, 2, 4, 4]
    assert trb._sample(log_p, None).tolist() == [1] * 4  # greedy: the first of the tied maxima


def test_teacher_none_at_eps0():
    """teacher=None works at eps = 0, equals the student-only rollout with a teacher passed (bitwise: at eps = 0 the
    teacher is never run, so both take the same code path), and reports beta = 0."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2)
    ids, mask = left_padded_prompts()
    alone = trb.blended_generate(student, None, ids, mask, eps=0.0, max_new_tokens=8,
                                 generator=torch.Generator().manual_seed(0))
    paired = trb.blended_generate(student, teacher, ids, mask, eps=0.0, max_new_tokens=8,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(alone.sequences, paired.sequences)
    assert bool((alone.beta == 0).all()) and bool(alone.teacher_logprobs.isnan().all())
    with pytest.raises(ValueError):
        trb.blended_generate(student, None, ids, mask, eps=0.1, max_new_tokens=2)


def test_skd_keeps_only_teacher_top_k_tokens():
    """SKD never keeps a student token outside the teacher's top-K; its behavior log-probs are the exact mixture."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2, layers=3)
    ids, mask = left_padded_prompts()
    cfg = SimpleNamespace(temperature=1.0, skd_top_k=5, skd_temperature=0.6)
    kwargs = trb.behavior("skd", 0, cfg)
    assert trb.behavior_needs_teacher(kwargs)
    rollout = trb.blended_generate(student, teacher, ids, mask, max_new_tokens=10,
                                   generator=torch.Generator().manual_seed(0), **kwargs)
    _, _, s, t = uncached_recompute(student, teacher, rollout, mask, 0.0, 1.0)
    tokens = rollout.sequences[:, ids.shape[1]:]
    m = rollout.completion_mask
    # The top-5 sets below come from uncached logits (~5e-6 from the cached ones the rule saw), so they are the rule's
    # sets on any CPU only if no 5th and 6th logits nearly tie: require a gap of 1e-4 (1.7e-3 measured).
    fifth, sixth = t.topk(6, -1).values[..., 4:].unbind(-1)  # (B, N) each
    assert bool((fifth - sixth)[m].min() > 1e-4)
    in_top = (t.topk(5, -1).indices == tokens[..., None]).any(-1)  # (B, N)
    assert bool(in_top[m & ~rollout.replaced].all())
    assert 0 < evaluation.rollout_stats(rollout)["replaced_frac"] < 1
    log_ps, log_pt = torch.log_softmax(s, -1), torch.log_softmax(t / 0.6, -1)
    top = torch.zeros_like(log_ps, dtype=torch.bool).scatter_(-1, t.topk(5, -1).indices, True)
    q = log_ps.exp() * top + (log_ps.exp() * ~top).sum(-1, keepdim=True) * log_pt.exp()
    expected = q.gather(-1, tokens[..., None]).squeeze(-1).log()
    # Cached vs uncached logits (~5e-6) and another formula for q (logaddexp vs sums of probabilities): 1e-4.
    torch.testing.assert_close(rollout.behavior_logprobs[m], expected[m], atol=1e-4, rtol=1e-4)


def test_behavior_policies_define_their_budgets():
    """Each named policy yields its defining eps and temperature; an unknown name is an error."""
    # Exact: Python floats (no SIMD); 0.0, float(eps0) and math.inf are literals or copies.
    cfg = SimpleNamespace(eps0=0.02, warmup_steps=50, temperature=1.0, tau0=0.8, skd_top_k=25, skd_temperature=0.6)
    assert trb.behavior("opd", 3, cfg)["eps"] == 0.0
    assert not trb.behavior_needs_teacher(trb.behavior("opd", 3, cfg))
    assert trb.behavior("trb", 25, cfg)["eps"] == pytest.approx(0.01)
    assert trb.behavior("trb", 50, cfg)["eps"] == 0.0 and not trb.behavior_needs_teacher(trb.behavior("trb", 60, cfg))
    assert trb.behavior("fixed_eps", 500, cfg)["eps"] == 0.02
    assert trb.behavior("teacher", 0, cfg)["eps"] == math.inf
    warm = [trb.behavior("temperature_warmup", k, cfg)["temperature"] for k in (0, 25, 50, 80)]
    assert warm == pytest.approx([0.8, 0.9, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown behavior policy"):
        trb.behavior("nope", 0, cfg)


def test_larger_budget_moves_rollouts_toward_the_teacher():
    """The mean teacher log-prob of sampled tokens rises with eps (docs/method.md section 7). Seeds 0-3 all order them so
    with gaps >= 0.33 nats against a seed-to-seed spread of ~0.1, so a sample that flips on another CPU cannot
    reorder them."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2, layers=3)
    ids, mask = left_padded_prompts()
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    means = []
    for eps in (0.0, 0.05, 0.5, math.inf):
        rollout = trb.blended_generate(student, teacher, ids, mask, eps=eps, max_new_tokens=12,
                                       generator=torch.Generator().manual_seed(0), token_rule=None)
        _, _, _, t = uncached_recompute(student, teacher, rollout, mask, 0.0, 1.0)
        tokens = rollout.sequences[:, ids.shape[1]:]
        means.append(float(torch.log_softmax(t, -1).gather(-1, tokens[..., None]).mean()))
    assert means == sorted(means)


def test_padded_heads_never_sample_beyond_shared_vocab():
    """Heads wider than the tokenizer are compared over the shared range; rows beyond it are never sampled."""
    student, teacher = tiny_qwen3(1, vocab=VOCAB + 8), tiny_qwen3(2, vocab=VOCAB + 16)
    with torch.no_grad():  # make the padded rows overwhelmingly likely, so sampling them would show
        student.lm_head.weight[VOCAB:] *= 200
        teacher.lm_head.weight[VOCAB:] *= 200
    ids, mask = left_padded_prompts()
    rollout = trb.blended_generate(student, teacher, ids, mask, eps=0.05, max_new_tokens=10, vocab_size=VOCAB,
                                   generator=torch.Generator().manual_seed(0))
    assert int(rollout.sequences.max()) < VOCAB
    default = trb.blended_generate(student, teacher, ids, mask, eps=0.05, max_new_tokens=3,
                                   generator=torch.Generator().manual_seed(0))
    assert int(default.sequences.max()) < VOCAB + 8  # default: the narrower head


def test_eos_canonicalised_across_models():
    """Two EOS ids become one stop event emitted as the first id; its probability is the sum of both."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    merged = trb.canonicalise_eos(logits, [1, 3])
    # float32 logsumexp and softmax vs math.exp values divided in float32: a few ulp of O(1) (1.5e-8 measured).
    torch.testing.assert_close(torch.softmax(merged, -1), torch.tensor([[math.exp(0), math.exp(1) + math.exp(3),
                                                                         math.exp(2), 0.0]]) / torch.exp(logits).sum(),
                               rtol=1e-5, atol=1e-6)
    student, teacher = tiny_qwen3(1), tiny_qwen3(2)
    ids, mask = left_padded_prompts()
    eos_a, eos_b = early_eos(student, ids, mask, 0), early_eos(teacher, ids, mask, 0)
    rollout = trb.blended_generate(student, teacher, ids, mask, eps=0.05, max_new_tokens=10,
                                   eos_token_id=[eos_a, eos_b], pad_token_id=PAD, temperature=0.0)
    assert eos_a != eos_b
    generated = rollout.sequences[:, ids.shape[1]:]
    assert not bool((generated == eos_b).any()) and bool((generated == eos_a).any())


def word_tokenizer(words):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def test_vocabulary_mismatch_is_refused():
    """Tokenizers whose vocabularies differ are refused with an error naming the first differing id."""
    a = word_tokenizer(["<unk>", "a", "b", "c"])
    assert check_same_vocab(a, word_tokenizer(["<unk>", "a", "b", "c"])) == 4
    with pytest.raises(ValueError, match="differ at id 2"):
        check_same_vocab(a, word_tokenizer(["<unk>", "a", "x", "c"]))
    with pytest.raises(ValueError, match="differ at id 4"):
        check_same_vocab(a, word_tokenizer(["<unk>", "a", "b", "c", "d"]))


def test_bf16_models_and_empty_completions_stay_finite():
    """bf16 models give finite betas and log-probs; zero new tokens gives an empty rollout and a finite zero loss."""
    student, teacher = tiny_qwen3(1).to(torch.bfloat16), tiny_qwen3(2).to(torch.bfloat16)
    ids, mask = left_padded_prompts()
    rollout = trb.blended_generate(student, teacher, ids, mask, eps=0.05, max_new_tokens=6,
                                   generator=torch.Generator().manual_seed(0))
    for field in (rollout.beta, rollout.behavior_logprobs, rollout.realised_kl, rollout.teacher_logprobs):
        assert bool(torch.isfinite(field).all())
    empty = trb.blended_generate(student, teacher, ids, mask, eps=0.05, max_new_tokens=0)
    # Exact: the prompt concatenated with no tokens, and a loss that sums over no positions.
    assert torch.equal(empty.sequences, ids) and empty.completion_mask.shape == (ids.shape[0], 0)
    assert evaluation.rollout_stats(empty)["completion_tokens"] == 0
    logits = torch.randn(ids.shape[0], 0, VOCAB, requires_grad=True)
    loss = trb.opd_loss(logits, logits.detach(), empty.completion_mask)
    assert loss.item() == 0.0


def test_stop_checked_every_k_tokens_only_adds_masked_padding():
    """stop_check_every=4 asks all_finished every 4 tokens: it decodes up to 3 tokens more than asking every token,
    and those are padding outside completion_mask; the columns they share are equal (the same ops on the same values,
    greedy), so nothing the loss or the metrics read changes."""
    student, teacher = tiny_qwen3(1), tiny_qwen3(2)
    ids, mask = left_padded_prompts()
    asks = []

    def run(k):
        asks.clear()
        return trb.blended_generate(student, teacher, ids, mask, eps=0.02, max_new_tokens=20, temperature=0.0,
                                    eos_token_id=list(range(1, 40)), pad_token_id=PAD,
                                    decoding=fast.Decoding(stop_check_every=k),
                                    all_finished=lambda done: asks.append(1) or bool(done.all()))
    every, (k4, k4_asks) = run(1), (run(4), len(asks))
    n1, n4 = every.completion_mask.shape[1], k4.completion_mask.shape[1]
    assert n1 < 20 and n4 == min(-(-n1 // 4) * 4, 20) and k4_asks == n4 // 4  # rows stop early; asked every 4
    P = ids.shape[1]
    assert torch.equal(k4.sequences[:, :P + n1], every.sequences)
    assert torch.equal(k4.completion_mask[:, :n1], every.completion_mask)
    assert not k4.completion_mask[:, n1:].any() and bool((k4.sequences[:, P + n1:] == PAD).all())
    for name in ("beta", "behavior_logprobs", "teacher_logprobs"):
        torch.testing.assert_close(getattr(k4, name)[:, :n1], getattr(every, name), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError):
        run(0)
