"""The on-device sampler: allowed sets, the temperature distribution, penalties, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import sampling
from infer.sampling import SamplingParams
from qwen_jax import RequestError

V = 12


def _draw(logits, sp: SamplingParams, n: int, counts=None, seen=None):
    """n samples of one row (each with its own key via the `generated` counter)."""
    rp = sampling.row_params([sp] * n, [sp.seed or 0] * n, list(range(n)), n)
    lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, V))
    c = jnp.zeros((n, V), jnp.int32) if counts is None else jnp.broadcast_to(counts, (n, V))
    s = jnp.zeros((n, V), bool) if seen is None else jnp.broadcast_to(seen, (n, V))
    tokens, chosen, _, _ = jax.jit(sampling.sample)(lg, rp, c, s)
    return np.asarray(tokens), np.asarray(chosen)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_k_top_p_min_p_never_leave_the_allowed_set(rng):
    logits = rng.standard_normal(V) * 2
    order = np.argsort(-logits)
    p = _softmax(logits)
    cases = {
        SamplingParams(temperature=1.0, top_k=3, seed=1): set(order[:3]),
        SamplingParams(temperature=1.0, top_p=0.6, seed=2): set(order[:np.searchsorted(np.cumsum(p[order]), 0.6) + 1]),
        SamplingParams(temperature=1.0, min_p=0.2, seed=3): set(np.nonzero(p >= 0.2 * p.max())[0]),
    }
    for sp, allowed in cases.items():
        tokens, _ = _draw(logits, sp, 2000)
        assert set(tokens.tolist()) <= allowed, sp
        assert len(set(tokens.tolist())) == len(allowed)  # and every allowed token shows up


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax(rng, temperature):
    logits = rng.standard_normal(V)
    n = 20000
    tokens, _ = _draw(logits, SamplingParams(temperature=temperature, seed=int(rng.integers(1000))), n)
    freq = np.bincount(tokens, minlength=V) / n
    expected = _softmax(logits / temperature)
    # chi-square statistic with V-1 = 11 degrees of freedom; P(chi2 > 40) is about 4e-5 for a correct sampler,
    # while a wrong temperature or filter gives thousands at n = 20000
    chi2 = n * np.sum((freq - expected) ** 2 / expected)
    assert chi2 < 40.0, (chi2, freq, expected)


def test_greedy_and_logprobs(rng):
    logits = rng.standard_normal(V)
    tokens, chosen = _draw(logits, SamplingParams(temperature=0), 4)
    assert (tokens == np.argmax(logits)).all()
    np.testing.assert_allclose(chosen, np.log(_softmax(logits))[np.argmax(logits)], rtol=1e-5)


def test_penalties_match_their_definition(rng):
    logits = rng.standard_normal(V).astype(np.float32) * 3
    counts = np.zeros(V, np.int32)
    counts[[1, 4]] = [2, 1]
    seen = np.zeros(V, bool)
    seen[[4, 7]] = True
    sp = SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    rp = sampling.row_params([sp], [0], [0], 1)
    got = np.asarray(sampling.apply_penalties(jnp.asarray(logits[None]), rp, jnp.asarray(counts[None]),
                                              jnp.asarray(seen[None])))[0]
    ref = logits.copy()
    hit = seen | (counts > 0)
    ref[hit] = np.where(ref[hit] > 0, ref[hit] / 1.5, ref[hit] * 1.5)
    ref -= 0.5 * (counts > 0) + 0.25 * counts
    # the subtraction can cancel to near zero, where a relative bound alone is meaningless
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(max_tokens=0), "max_tokens"), (dict(repetition_penalty=0), "repetition"),
    (dict(presence_penalty=3), "presence"), (dict(seed=-1), "seed"), (dict(logprobs=50), "logprobs"),
    (dict(stop=("",)), "stop"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(RequestError, match=msg):
        SamplingParams(**kw).validate()


def test_a_stop_string_is_one_stop_and_bad_values_are_request_errors():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from qwen_jax import RequestError

    assert SamplingParams(stop="the").validate().stop == ("the",)
    assert SamplingParams(stop=["a", "bc"], stop_token_ids=7).validate().stop_token_ids == (7,)
    values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                       st.text(max_size=5), st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3))
    fields = ["max_tokens", "n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs"]

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(fields), values, max_size=4))
    def check(kw):
        try:
            SamplingParams(**kw).validate()  # either valid ...
        except RequestError as e:  # ... or one clean error naming the field
            assert str(e).startswith("invalid sampling parameter: ") and any(f in str(e) for f in kw)

    check()


def test_vocabulary_major_argmax_matches_argmax_ties_included():
    """sampling.argmax_VB (the engine's greedy step over [V, B] logits) against jnp.argmax down the vocabulary:
    vocabularies that split into blocks of 128, 64, 16 and that do not, with small integer logits so maxima tie
    within and across blocks (the first index must win)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    argmax_VB = jax.jit(sampling.argmax_VB)

    @settings(max_examples=40, deadline=None)
    @given(st.sampled_from([12, 37, 256, 384, 1000, 1187 * 128, 64 * 3, 16 * 5]), st.integers(1, 33),
           st.integers(0, 2**32 - 1))
    def check(V, B, seed):
        logits = np.random.default_rng(seed).integers(-3, 4, (V, B)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(argmax_VB(jnp.asarray(logits))), logits.argmax(axis=0))

    check()
