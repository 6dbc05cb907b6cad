"""The engine's choice of compiled program (infer/programs.py): a step runs on its own program or on a larger
one already built, and its own is built once the padding it wasted (with the coming run's) reaches a
build's cost."""

from hypothesis import given, settings
from hypothesis import strategies as st

from infer.programs import Programs, Shape


def decode(rows, width=4, fast=True):
    return Shape("decode", (rows, width), fast)


def prefill(rows, tokens, width=2, fast=True):
    return Shape("prefill", (rows, tokens, width), fast)


def test_the_first_program_of_a_kind_is_built_and_then_serves_smaller_steps():
    p = Programs()
    assert p.choose(decode(32)) == decode(32)  # nothing built: its own
    p.record_build(decode(32), 2.0)
    assert p.choose(decode(8)) == decode(32)
    assert p.choose(decode(8, width=8)) == decode(8, width=8)  # wider than anything built
    assert p.choose(decode(8, fast=False)) == decode(8, fast=False)  # a decode window keeps its variant
    assert p.choose(prefill(1, 16)) == prefill(1, 16)  # another kind
    p.record_build(prefill(4, 64, fast=False), 1.0)
    assert p.choose(prefill(1, 16)) == prefill(4, 64, fast=False)  # the full sampler serves greedy prefill
    assert p.choose(prefill(1, 16, width=4)) == prefill(1, 16, width=4)


def test_the_smallest_covering_program_is_chosen_and_a_continuing_window_keeps_its_rows():
    p = Programs()
    for rows in (32, 16):
        p.record_build(decode(rows), 2.0)
    assert p.choose(decode(8)) == decode(16)
    assert p.choose(decode(8), rows=32) == decode(32)
    assert p.choose(decode(8, width=2), rows=24) == decode(24, width=2)  # no program has 24 rows: built


def test_patience_zero_builds_every_steps_own_program_and_infinity_none_that_is_covered():
    eager, never = Programs(patience=0), Programs(patience=float("inf"))
    for p in (eager, never):
        p.record_build(decode(32), 2.0)
        p.record_run(decode(8), decode(32), 100.0, steps=8)
    assert eager.choose(decode(8)) == decode(8)
    assert never.choose(decode(8)) == decode(32) and never.waste[decode(8)] == 75.0


def test_waste_is_interpolated_between_measured_programs():
    p = Programs()
    for rows, per_step in ((32, 0.16), (8, 0.08)):
        p.record_build(decode(rows), 2.0)
        p.record_run(decode(rows), decode(rows), 8 * per_step, steps=8)
    p.record_run(decode(24), decode(32), 1.28, steps=8)
    # own at 24 rows: 0.08 + (0.16 - 0.08) * (24 - 8) / (32 - 8) per step, a sixth less than 32 rows
    assert abs(p.waste[decode(24)] - 1.28 / 6) < 1e-9
    p.record_run(decode(4), decode(8), 0.64, steps=8)  # nothing measured below: proportional, the most
    assert abs(p.waste[decode(4)] - 0.32) < 1e-9


@settings(max_examples=200, deadline=None)
@given(price=st.floats(0.1, 10), per_step=st.floats(0.01, 2), steps=st.integers(1, 8),
       rows=st.sampled_from([8, 12, 16, 24]), runs=st.integers(1, 60))
def test_ski_rental_a_step_builds_its_own_before_its_waste_passes_the_price(price, per_step, steps, rows, runs):
    """With run times as measured, the step's own program is built at the first run whose waste would take
    the charges to the build price: the waste spent before building stays under the price, and it is
    never built while the charges with the next run's stay under it."""
    p = Programs()
    big, own = decode(32), decode(rows)
    p.record_build(big, price)
    p.record_run(big, big, per_step * steps, steps)
    spent, built_at = 0.0, None
    for i in range(runs):
        used = p.choose(own, steps=steps)
        if used == own:
            built_at = i
            break
        before = p.waste[own]
        p.record_run(own, used, p.step_time[big] * steps, steps)
        spent += p.waste[own] - before
    per_run = p.step_time[big] * steps * (1 - rows / 32)
    assert spent < price + 1e-9
    if built_at is None:
        assert runs * per_run < price + 1e-9
    else:
        assert (built_at + 1) * per_run >= price - 1e-9


def test_a_known_horizon_vetoes_a_build_the_requests_end_before_it_pays():
    p = Programs()
    p.record_build(decode(32), 1.0)
    p.record_run(decode(32), decode(32), 0.8, steps=8)  # 0.1 s per step; 8 rows would save at most 0.075
    assert p.choose(decode(8), steps=8, horizon=100) == decode(32)  # no charges yet: the horizon alone never builds
    p.record_run(decode(8), decode(32), 0.8, steps=8)  # charged 0.6
    assert p.choose(decode(8), steps=8) == decode(8)  # ski rental (horizon unknown): 0.6 + 0.6 >= 1.0
    assert p.choose(decode(8), steps=8, horizon=14) == decode(8)  # 14 x 0.075 >= 1.0: it can still pay
    assert p.choose(decode(8), steps=8, horizon=13) == decode(32)  # these requests end before it pays
    p.record_run(decode(8), decode(32), 0.8 * 2, steps=16)
    assert p.choose(decode(8), steps=8, horizon=1) == decode(32)  # charged 1.8 < twice the price
    p.record_run(decode(8), decode(32), 0.8, steps=8)
    assert p.choose(decode(8), steps=8, horizon=1) == decode(8)  # charged 2.4: a shape that keeps coming back
