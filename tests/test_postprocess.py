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


# --- waypoint interpolation ------------------------------------------------------------------------

from vlm2vla_edge.runtime.postprocess import LIMIT_MARGIN, interpolate_waypoints  # noqa: E402


def test_a_waypoint_becomes_equal_steps_within_the_step_limit_with_the_gripper_change_last() -> None:
    out = interpolate_waypoints(chunk((0.0, 0.0, -0.12, 0.0)), 0.05, 0.20, gripper=1.0)
    assert len(out) == 3 and all(a.norm() <= 0.05 * LIMIT_MARGIN + 1e-12 for a in out)
    assert sum(a.dz for a in out) == pytest.approx(-0.12)
    assert [a.gripper for a in out] == [1.0, 1.0, 0.0]  # closes only once the grasp point is reached


def test_a_waypoint_beyond_the_chunk_budget_stops_there_without_its_gripper_change() -> None:
    out = interpolate_waypoints(chunk((-0.3, 0.0, -0.2, 0.0)), 0.05, 0.20, gripper=1.0)
    travelled = sum(a.norm() for a in out)
    assert travelled == pytest.approx(0.20 * LIMIT_MARGIN)
    assert all(a.gripper == 1.0 for a in out)  # not there yet: the gripper stays open
    direction = [sum(getattr(a, axis) for a in out) / travelled for axis in ("dx", "dy", "dz")]
    assert direction == pytest.approx([-0.3 / math.hypot(0.3, 0.2), 0.0, -0.2 / math.hypot(0.3, 0.2)])


def test_a_gripper_only_action_is_one_command_and_a_second_waypoint_follows_the_first() -> None:
    assert rows(interpolate_waypoints(chunk((0, 0, 0, 1.0)), 0.05, 0.2, gripper=0.0)) == [[0, 0, 0, 1.0]]
    out = interpolate_waypoints(chunk((0, 0, 0.06, 0.0), (0.04, 0, 0, 1.0)), 0.05, 0.2, gripper=0.0)
    assert [a.gripper for a in out] == [0.0, 0.0, 1.0]
    assert sum(a.dx for a in out) == pytest.approx(0.04) and sum(a.dz for a in out) == pytest.approx(0.06)


@settings(max_examples=300)
@given(
    st.lists(st.tuples(*(st.floats(-0.5, 0.5) for _ in range(3)), st.sampled_from([0.0, 1.0])), min_size=1, max_size=4),
    st.sampled_from([0.0, 1.0]),
)
def test_interpolation_never_exceeds_the_limits_nor_lengthens_the_path(raw, gripper) -> None:
    original = ActionChunk(tuple(Action(*r) for r in raw))
    out = interpolate_waypoints(original, 0.05, 0.20, gripper=gripper)
    assert all(a.norm() <= 0.05 * LIMIT_MARGIN + 1e-9 for a in out)
    assert sum(a.norm() for a in out) <= min(0.20 * LIMIT_MARGIN, sum(a.norm() for a in original)) + 1e-9
