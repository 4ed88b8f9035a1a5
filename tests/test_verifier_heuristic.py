"""The heuristic step verifier: subtask classification and one success and one failure per kind."""

from __future__ import annotations

import json
import statistics
import string
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm2vla_edge.runtime.robot.base import ArmState
from vlm2vla_edge.runtime.verifier import (
    HeuristicConfig,
    HeuristicVerifier,
    SubtaskKind,
    VerificationRequest,
    classify_subtask,
)
from vlm2vla_edge.runtime.verifier.heuristic import image_change

H = W = 256


def blank() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(90, 110, size=(H, W, 3), dtype=np.uint8)  # a textured, static table


def with_block(image: np.ndarray, u: float, v: float, half: int = 12, value: int = 230) -> np.ndarray:
    """A copy with a bright square (the 'object') centred at (u, v) image fractions."""
    out = image.copy()
    cu, cv = int(u * (W - 1)), int(v * (H - 1))
    out[max(0, cv - half) : cv + half, max(0, cu - half) : cu + half] = value
    return out


def state(
    position=(0.30, 0.0, 0.10), gripper_open: bool = True, opening: float | None = None
) -> ArmState:
    return ArmState(position=position, rpy=(0.0, 0.0, 0.0), gripper_open=gripper_open, gripper_opening=opening)


def request(
    subtask: str,
    pre_state: ArmState | None = None,
    post_state: ArmState | None = None,
    pre_image: np.ndarray | None = None,
    post_image: np.ndarray | None = None,
    commanded=(0.0, 0.0, 0.0),
    gripper_change=None,
    gripper_pixel=None,
    scene_after: str | None = None,
) -> VerificationRequest:
    image = blank()
    return VerificationRequest(
        instruction="put the carrot in the pan",
        subtask=subtask,
        next_subtask=None,
        motion_plan=None,
        pre_image=image if pre_image is None else pre_image,
        post_image=image if post_image is None else post_image,
        pre_state=pre_state or state(),
        post_state=post_state or state(),
        commanded_translation=commanded,
        gripper_change=gripper_change,
        gripper_pixel=gripper_pixel,
        scene_after=scene_after,
    )


VERIFIER = HeuristicVerifier()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Move to the carrot.", SubtaskKind.move),
        ("REACH the pan!", SubtaskKind.move),
        ("approach the fish", SubtaskKind.move),
        ("go to the plate", SubtaskKind.move),
        ("moving toward the pan", SubtaskKind.move),
        ("Lower the gripper onto the carrot", SubtaskKind.move),
        ("move to the carrot, then grasp it", SubtaskKind.move),
        ("grasp the carrot", SubtaskKind.grasp),
        ("Grab it.", SubtaskKind.grasp),
        ("pick the eggplant", SubtaskKind.grasp),
        ("pick up the carrot", SubtaskKind.lift),
        ("Pick-up the carrot", SubtaskKind.lift),
        ("lift the carrot", SubtaskKind.lift),
        ("raise it a little", SubtaskKind.lift),
        ("place the carrot in the pan", SubtaskKind.place),
        ("put it down", SubtaskKind.place),
        ("putting the carrot into the pan", SubtaskKind.place),
        ("drop the fish on the plate", SubtaskKind.place),
        ("release the carrot", SubtaskKind.place),
        ("push the pan to the left", SubtaskKind.push),
        ("slide the plate forward", SubtaskKind.push),
        ("open the gripper", SubtaskKind.open_gripper),
        ("Close gripper.", SubtaskKind.close_gripper),
        ("close the fingers", SubtaskKind.close_gripper),
        ("open the drawer", SubtaskKind.unknown),
        ("wave hello", SubtaskKind.unknown),
        ("", SubtaskKind.unknown),
    ],
)
def test_classify_subtask(text: str, kind: SubtaskKind) -> None:
    assert classify_subtask(text) is kind


@given(
    st.sampled_from(["move to the pan", "grasp the carrot", "lift the carrot", "place it in the pan", "push the pan"]),
    st.text(alphabet=string.punctuation + " \t", max_size=4),
    st.text(alphabet=string.punctuation + " \t", max_size=4),
    st.booleans(),
)
def test_classification_ignores_case_and_punctuation(text: str, before: str, after: str, upper: bool) -> None:
    noisy = before + (text.upper() if upper else text.title()) + after
    assert classify_subtask(noisy) is classify_subtask(text)


# -- move ------------------------------------------------------------------------------------------


def test_move_succeeds_when_most_of_the_commanded_move_happened() -> None:
    v = VERIFIER.verify(request("move to the carrot", post_state=state((0.34, 0.0, 0.10)), commanded=(0.05, 0.0, 0.0)))
    assert v.success, v.reason
    assert v.verifier == "heuristic" and v.error is None and v.attempts == 1
    assert "move:" in v.reason and "moved 4.0 cm of 5.0 cm" in v.reason


def _scene(carrot_dx: int, carrot_dy: int) -> str:
    """Scene text as the simulator writes it: offsets (metres) from the gripper to each object's points."""
    return (
        "gripper open, holding nothing. "
        f"carrot on the table: above ({carrot_dx / 100:g}, {carrot_dy / 100:g}, 0), "
        f"grasp ({carrot_dx / 100:g}, {carrot_dy / 100:g}, -0.08). "
        "pan on the table: above (-0.14, -0.15, 0)."
    )


@pytest.mark.parametrize(("dx", "dy", "done"), [(1, -2, True), (0, 3, True), (12, 0, False), (-3, 3, False)])
def test_move_to_an_object_needs_the_gripper_over_it_when_the_scene_text_says_where(dx, dy, done) -> None:
    """A followed move is not yet an arrival: with scene text the object's offset decides, so a long
    reach takes several chunks instead of being declared done after the first."""
    v = VERIFIER.verify(
        request(
            "Move to the carrot",
            post_state=state((0.34, 0.0, 0.10)),
            commanded=(0.05, 0.0, 0.0),
            scene_after=_scene(dx, dy),
        )
    )
    assert v.success is done, v.reason
    assert ("over the carrot" if done else "from the carrot") in v.reason
    moved_not_followed = VERIFIER.verify(request(
        "Move to the carrot", post_state=state((0.30, 0.0, 0.10)), commanded=(0.05, 0.0, 0.0), scene_after=_scene(0, 0)
    ))
    assert not moved_not_followed.success


def test_move_naming_no_listed_object_falls_back_to_the_motion() -> None:
    v = VERIFIER.verify(request(
        "Move up", post_state=state((0.30, 0.0, 0.15)), commanded=(0.0, 0.0, 0.05), scene_after=_scene(20, 0)
    ))
    assert v.success, v.reason


@pytest.mark.parametrize(
    ("reached", "why"),
    [
        ((0.31, 0.0, 0.10), "only 20% of the way"),
        ((0.30, 0.04, 0.10), "moved sideways instead"),
        ((0.45, 0.0, 0.10), "overshot three times the command"),
    ],
)
def test_move_fails_when_the_arm_did_not_follow(reached, why) -> None:
    v = VERIFIER.verify(request("move to the carrot", post_state=state(reached), commanded=(0.05, 0.0, 0.0)))
    assert not v.success, why


def test_move_with_no_commanded_motion_is_not_confirmed() -> None:
    v = VERIFIER.verify(request("move to the carrot", commanded=(0.001, 0.0, 0.0)))
    assert not v.success
    assert "no end-effector move was commanded" in v.reason


# -- grasp -----------------------------------------------------------------------------------------


def test_grasp_succeeds_when_fingers_stop_on_an_object() -> None:
    post = state(gripper_open=False, opening=0.3)
    v = VERIFIER.verify(request("grasp the carrot", state(opening=1.0), post, gripper_change="close"))
    assert v.success, v.reason
    assert "opening 0.30" in v.reason


@pytest.mark.parametrize(
    ("post", "expected"),
    [
        (state(gripper_open=False, opening=0.01), "closed fully"),
        (state(gripper_open=False, opening=0.97), "still open"),
        (state(gripper_open=True, opening=1.0), "gripper is open"),
        (state(gripper_open=False, opening=float("nan")), "not a number"),
    ],
)
def test_grasp_fails_on_empty_fingers_or_no_close(post: ArmState, expected: str) -> None:
    v = VERIFIER.verify(request("grasp the carrot", state(opening=1.0), post, gripper_change="close"))
    assert not v.success
    assert expected in v.reason


def test_grasp_without_finger_measurement_uses_the_image_near_the_gripper() -> None:
    pre_img = with_block(blank(), 0.5, 0.5)
    post_img = with_block(blank(), 0.5, 0.45, value=40)  # fingers closed over the object: the region changed
    post = state(gripper_open=False, opening=None)
    ok = VERIFIER.verify(request("grasp the carrot", state(), post, pre_img, post_img, gripper_pixel=(0.5, 0.5)))
    assert ok.success and "image evidence only" in ok.reason
    # The same change far from the gripper does not count.
    miss = VERIFIER.verify(request("grasp the carrot", state(), post, pre_img, post_img, gripper_pixel=(0.05, 0.95)))
    assert not miss.success
    still = VERIFIER.verify(request("grasp the carrot", state(), post, pre_img, pre_img, gripper_pixel=(0.5, 0.5)))
    assert not still.success


# -- lift ------------------------------------------------------------------------------------------


def test_lift_succeeds_with_height_and_object_held() -> None:
    pre = state((0.3, 0.0, 0.05), gripper_open=False, opening=0.3)
    post = state((0.3, 0.0, 0.10), gripper_open=False, opening=0.28)
    v = VERIFIER.verify(request("lift the carrot", pre, post, commanded=(0.0, 0.0, 0.05)))
    assert v.success, v.reason


@pytest.mark.parametrize(
    ("post", "expected"),
    [
        (state((0.3, 0.0, 0.055), gripper_open=False, opening=0.3), "height gained 0.5 cm"),
        (state((0.3, 0.0, 0.10), gripper_open=False, opening=0.0), "closed fully"),  # the object slipped out
        (state((0.3, 0.0, 0.10), gripper_open=True, opening=1.0), "gripper is open"),
    ],
)
def test_lift_fails_without_height_or_without_object(post: ArmState, expected: str) -> None:
    pre = state((0.3, 0.0, 0.05), gripper_open=False, opening=0.3)
    v = VERIFIER.verify(request("lift the carrot", pre, post, commanded=(0.0, 0.0, 0.05)))
    assert not v.success
    assert expected in v.reason


# -- place / release -------------------------------------------------------------------------------


def test_place_succeeds_when_the_gripper_opens_and_the_object_leaves() -> None:
    pre_img = with_block(blank(), 0.5, 0.5)  # the object between the fingers
    post_img = blank()  # it dropped out of the region
    pre = state(gripper_open=False, opening=0.3)
    post = state(gripper_open=True, opening=1.0)
    v = VERIFIER.verify(request("place the carrot in the pan", pre, post, pre_img, post_img, gripper_change="open",
                                gripper_pixel=(0.5, 0.5)))
    assert v.success, v.reason


def test_place_fails_when_still_closed_or_nothing_left() -> None:
    pre_img = with_block(blank(), 0.5, 0.5)
    closed = VERIFIER.verify(request("put the carrot in the pan", state(gripper_open=False, opening=0.3),
                                     state(gripper_open=False, opening=0.3), pre_img, blank()))
    assert not closed.success and "closed" in closed.reason
    stuck = VERIFIER.verify(request("release the carrot", state(gripper_open=False, opening=0.3),
                                    state(gripper_open=True, opening=1.0), pre_img, pre_img))
    assert not stuck.success and "did not change" in stuck.reason
    half = VERIFIER.verify(request("drop the carrot", state(gripper_open=False, opening=0.3),
                                   state(gripper_open=True, opening=0.2), pre_img, blank()))
    assert not half.success and "opening is 0.20" in half.reason


# -- push ------------------------------------------------------------------------------------------


def test_push_needs_motion_and_a_scene_change() -> None:
    pre_img = with_block(blank(), 0.4, 0.5, half=20)
    post_img = with_block(blank(), 0.55, 0.5, half=20)
    moved = state((0.35, 0.0, 0.10))
    ok = VERIFIER.verify(
        request("push the pan to the right", state(), moved, pre_img, post_img, commanded=(0.05, 0, 0))
    )
    assert ok.success, ok.reason
    no_change = VERIFIER.verify(request("push the pan", state(), moved, pre_img, pre_img, commanded=(0.05, 0, 0)))
    assert not no_change.success and "nothing was pushed" in no_change.reason
    no_motion = VERIFIER.verify(request("push the pan", state(), state(), pre_img, post_img, commanded=(0.05, 0, 0)))
    assert not no_motion.success


# -- gripper and unknown ---------------------------------------------------------------------------


def test_open_and_close_gripper() -> None:
    assert VERIFIER.verify(request("open the gripper", post_state=state(gripper_open=True, opening=0.95))).success
    assert not VERIFIER.verify(request("open the gripper", post_state=state(gripper_open=False, opening=0.0))).success
    assert not VERIFIER.verify(request("open the gripper", post_state=state(gripper_open=True, opening=0.1))).success
    assert VERIFIER.verify(request("close the gripper", post_state=state(gripper_open=False, opening=0.0))).success
    assert not VERIFIER.verify(request("close the gripper", post_state=state(gripper_open=True))).success


def test_unknown_subtask_needs_the_command_followed_and_a_scene_change() -> None:
    pre_img, post_img = blank(), with_block(blank(), 0.5, 0.5, half=30)
    moved = state((0.35, 0.0, 0.10))
    ok = VERIFIER.verify(request("wipe the table", state(), moved, pre_img, post_img, commanded=(0.05, 0, 0)))
    assert ok.success and ok.reason.startswith("unknown:")
    assert not VERIFIER.verify(
        request("wipe the table", state(), moved, pre_img, pre_img, commanded=(0.05, 0, 0))
    ).success
    assert not VERIFIER.verify(
        request("wipe the table", state(), state(), pre_img, post_img, commanded=(0.05, 0, 0))
    ).success


# -- image measure, validation, speed, determinism -------------------------------------------------


def test_image_change_measures_whole_image_and_region() -> None:
    pre = np.zeros((100, 100, 3), np.uint8)
    post = pre.copy()
    post[:10, :10] = 255  # 1% of the pixels, in the top-left corner
    req = request("move", pre_image=pre, post_image=post, gripper_pixel=(0.95, 0.95))
    change = image_change(req, HeuristicConfig())
    assert change.changed_fraction == pytest.approx(0.01)
    assert change.mean_abs_diff == pytest.approx(0.01)
    assert change.region_changed_fraction == 0.0 and change.region_known
    corner = image_change(request("move", pre_image=pre, post_image=post, gripper_pixel=(0.0, 0.0)), HeuristicConfig())
    assert corner.region_changed_fraction > 0.1
    small = post.copy()
    small[:10, :10] = 20  # below the per-pixel threshold: camera noise, not a change
    assert image_change(request("move", pre_image=pre, post_image=small), HeuristicConfig()).changed_fraction == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pre_image": np.zeros((8, 8, 3), np.float32)}, "uint8"),
        ({"pre_image": np.zeros((8, 8), np.uint8)}, "H x W x 3"),
        ({"post_image": np.zeros((9, 8, 3), np.uint8), "pre_image": np.zeros((8, 8, 3), np.uint8)}, "differ in size"),
        ({"commanded": (0.0, float("nan"), 0.0)}, "finite"),
        ({"gripper_pixel": (1.5, 0.5)}, "fractions"),
        ({"gripper_change": "toggle"}, "gripper_change"),
    ],
)
def test_request_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        request("grasp the carrot", **kwargs)


def test_verdict_is_json_ready_and_cancel_is_honoured() -> None:
    import threading

    v = VERIFIER.verify(request("grasp the carrot", post_state=state(gripper_open=False, opening=0.3)))
    record = json.loads(json.dumps(v.to_dict()))
    assert record["verifier"] == "heuristic" and record["success"] is True and record["fallback_from"] is None
    cancel = threading.Event()
    cancel.set()
    stopped = VERIFIER.verify(request("grasp the carrot"), cancel)
    assert stopped.cancelled and not stopped.success


def test_fast_on_256_px_images() -> None:
    rng = np.random.default_rng(1)
    pre = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    post = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    req = request("grasp the carrot", post_state=state(gripper_open=False), pre_image=pre, post_image=post,
                  gripper_pixel=(0.5, 0.5))
    times = []
    for _ in range(30):
        t = time.perf_counter()
        VERIFIER.verify(req)
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.005, f"median {statistics.median(times) * 1000:.2f} ms"


positions = st.tuples(*[st.floats(-0.5, 0.5, allow_nan=False)] * 3)


@settings(max_examples=60, deadline=None)
@given(
    subtask=st.sampled_from(["move to the pan", "grasp it", "lift it", "place it", "push it", "open the gripper",
                             "close the gripper", "dance"]),
    pre=positions,
    post=positions,
    commanded=positions,
    opening=st.one_of(st.none(), st.floats(0, 1)),
    closed=st.booleans(),
)
def test_verdicts_are_deterministic_and_never_raise(subtask, pre, post, commanded, opening, closed) -> None:
    req = request(subtask, state(pre), state(post, gripper_open=not closed, opening=opening), commanded=commanded)
    first, second = VERIFIER.verify(req), VERIFIER.verify(req)
    assert (first.success, first.reason) == (second.success, second.reason)
    assert first.reason


def test_move_to_an_object_is_not_done_while_the_gripper_is_still_high_above_its_approach_point() -> None:
    """A move the chunk budget cut short can end right above the object but far too high: not an arrival."""
    high = _scene(1, 0).replace("above (0.01, 0, 0)", "above (0.01, 0, -0.07)")
    v = VERIFIER.verify(request(
        "Move to the carrot", post_state=state((0.34, 0.0, 0.10)), commanded=(0.05, 0.0, 0.0), scene_after=high
    ))
    assert not v.success and "approach height" in v.reason
