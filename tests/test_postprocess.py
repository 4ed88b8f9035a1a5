"""Re-aggregation of tiny moves: worked examples and the properties the rule promises."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import PostProcess
from vlm2vla_edge.runtime.parser import parse_action_chunk
from vlm2vla_edge.runtime.postprocess import reaggregate

PAPER = PostProcess()  # 2.5 cm per direction, 5 cm absolute


def chunk(*rows: tuple[float, float, float, float]) -> ActionChunk:
    return ActionChunk(tuple(Action(*row) for row in rows))


def rows(c: ActionChunk) -> list[list[float]]:
    return [[round(v, 12) for v in a.as_list()] for a in c]


def test_disabled_returns_the_same_chunk() -> None:
    original = chunk((0.001, 0, 0, 1), (0.001, 0, 0, 1))
    assert reaggregate(original, PostProcess(enabled=False)) is original


def test_tiny_moves_merge_until_one_axis_reaches_the_threshold() -> None:
    c = parse_action_chunk("[[0.01, 0, 0, 1], [0.01, 0.005, 0, 1], [0.005, 0, 0, 1], [0.01, 0, -0.01, 1]]")
    assert rows(reaggregate(c, PAPER)) == [[0.025, 0.005, 0.0, 1.0], [0.01, 0.0, -0.01, 1.0]]


def test_negative_directions_count_by_magnitude() -> None:
    c = chunk((0, -0.015, 0, 1), (0, -0.015, 0, 1), (0, 0.001, 0, 1))
    assert rows(reaggregate(c, PAPER)) == [[0.0, -0.03, 0.0, 1.0], [0.0, 0.001, 0.0, 1.0]]


def test_absolute_threshold() -> None:
    pp = PostProcess(per_direction_threshold_m=0.1, absolute_threshold_m=0.05)
    c = chunk((0.02, 0.02, 0.01, 1), (0.01, 0.01, 0.01, 1), (0.001, 0, 0, 1))
    # after two actions: (0.03, 0.03, 0.02), norm 0.0469 < 0.05; after three: still 0.0475; no flush
    assert len(reaggregate(c, pp)) == 1
    c = chunk((0.03, 0.03, 0.01, 1), (0.01, 0.01, 0.01, 1), (0.001, 0, 0, 1))
    # (0.04, 0.04, 0.02) has norm 0.06 >= 0.05: flushed after the second action
    assert rows(reaggregate(c, pp)) == [[0.04, 0.04, 0.02, 1.0], [0.001, 0.0, 0.0, 1.0]]


def test_gripper_change_flushes_first() -> None:
    c = chunk((0.005, 0, 0, 1), (0.005, 0, 0, 1), (0, 0, 0, 0), (0, 0, 0.01, 0), (0, 0, 0.01, 0))
    assert rows(reaggregate(c, PAPER)) == [[0.01, 0.0, 0.0, 1.0], [0.0, 0.0, 0.02, 0.0]]


def test_zero_translation_gripper_command_is_kept() -> None:
    c = chunk((0.03, 0, 0, 1), (0, 0, 0, 0))
    assert rows(reaggregate(c, PAPER)) == [[0.03, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    only_gripper = chunk((0, 0, 0, 0),)
    assert rows(reaggregate(only_gripper, PAPER)) == [[0.0, 0.0, 0.0, 0.0]]


def test_zero_translation_no_op_is_dropped() -> None:
    c = chunk((0.03, 0, 0, 1), (0, 0, 0, 1), (0, 0, 0, 1))
    assert rows(reaggregate(c, PAPER)) == [[0.03, 0.0, 0.0, 1.0]]
    # moves that cancel out are a no-op too only when they sum to exactly zero
    c = chunk((0.03, 0, 0, 1), (0.001, 0, 0, 1), (-0.001, 0, 0, 1))
    assert rows(reaggregate(c, PAPER)) == [[0.03, 0.0, 0.0, 1.0]]


def test_non_finite_values_are_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        reaggregate(chunk((math.nan, 0, 0, 1)), PAPER)


# --- properties -------------------------------------------------------------------------------------

small = st.floats(min_value=-0.2, max_value=0.2, allow_nan=False, allow_subnormal=True)
thousandths = st.integers(-200, 200).map(lambda n: n / 1000)
axis = st.one_of(small, thousandths, st.just(0.0))
chunks = st.lists(st.builds(Action, axis, axis, axis, st.sampled_from([0.0, 1.0])), min_size=1, max_size=32).map(
    lambda a: ActionChunk(tuple(a))
)
settings_ = st.builds(
    PostProcess,
    per_direction_threshold_m=st.sampled_from([0.005, 0.025, 0.1]),
    absolute_threshold_m=st.sampled_from([0.01, 0.05, 0.3]),
)


def _runs(values: list[float]) -> list[float]:
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


@settings(max_examples=400, deadline=None)
@given(c=chunks, pp=settings_)
def test_total_translation_is_preserved(c: ActionChunk, pp: PostProcess) -> None:
    out = reaggregate(c, pp)
    assert 1 <= len(out) <= len(c)
    for axis_index in range(3):
        exact_in = sum((Fraction(a.as_list()[axis_index]) for a in c), Fraction(0))
        exact_out = sum((Fraction(a.as_list()[axis_index]) for a in out), Fraction(0))
        # rounding never accumulates: off by at most half an ulp of the last emitted value
        assert abs(exact_out - exact_in) <= Fraction(math.ulp(out[-1].as_list()[axis_index])) / 2
        assert math.fsum(a.as_list()[axis_index] for a in out) == pytest.approx(
            math.fsum(a.as_list()[axis_index] for a in c), abs=1e-15
        )


@settings(max_examples=400, deadline=None)
@given(c=chunks, pp=settings_)
def test_gripper_timing_and_thresholds(c: ActionChunk, pp: PostProcess) -> None:
    out = reaggregate(c, pp)
    # the sequence of gripper states is kept (no state lost, none invented)
    assert _runs([a.gripper for a in out]) == _runs([a.gripper for a in c])
    # every action but the last was emitted for a reason: a threshold reached or a gripper change next
    for current, following in zip(out.actions, out.actions[1:]):
        reached = (
            max(abs(v) for v in current.translation()) >= pp.per_direction_threshold_m
            or current.norm() >= pp.absolute_threshold_m
        )
        assert reached or following.gripper != current.gripper, (current, following)


thousandth_chunks = st.lists(
    st.builds(Action, thousandths, thousandths, thousandths, st.sampled_from([0.0, 1.0])), min_size=1, max_size=32
).map(lambda a: ActionChunk(tuple(a)))


@settings(max_examples=200, deadline=None)
@given(c=thousandth_chunks)
def test_moves_above_the_thresholds_pass_through(c: ActionChunk) -> None:
    """With thresholds below every move, each move is emitted as it is; only zero moves merge away."""
    pp = PostProcess(per_direction_threshold_m=1e-9, absolute_threshold_m=1e-9)
    moves = [a.translation() for a in reaggregate(c, pp) if any(a.translation())]
    assert moves == [a.translation() for a in c if any(a.translation())]
