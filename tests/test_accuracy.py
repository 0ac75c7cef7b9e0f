import numpy as np

from harness.accuracy import compare, perplexity


def test_identical_distributions_have_zero_kl():
    logits = np.random.default_rng(0).standard_normal((5, 50))
    c = compare(logits, logits)
    assert c["kl_mean"] == 0.0 and c["top1"] == 1.0 and c["max_logits_error"] == 0.0


def test_kl_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    p_logits, q_logits = rng.standard_normal((3, 7)), rng.standard_normal((3, 7))
    p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    expected = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(compare(q_logits, p_logits)["kl_per_token"], expected, rtol=1e-10)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    assert abs(perplexity(np.zeros((6, 40)), [1, 2, 3, 4, 5, 6]) - 40) < 1e-9


def test_perplexity_of_a_certain_model_is_one():
    tokens = [3, 1, 4, 1, 5]
    logits = np.full((5, 8), -1e4)
    logits[np.arange(4), tokens[1:]] = 0.0
    assert abs(perplexity(logits, tokens) - 1.0) < 1e-9
