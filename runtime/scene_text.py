"""Reading the text observation of a text-only policy: the scene description a perception stack reports.

The format is the simulator's `sim.render.describe` (the same text for every task): "gripper open, holding
nothing." then one sentence per object, "<name> on the table: above (...), grasp (...)." / "<name> in the
pot: ..." / "<name> in the gripper.". This module reads it without importing the simulator, so the
robot-side policy can use it (tests/test_layers.py) on any source of that text.
"""

from __future__ import annotations

import re
from typing import Literal

from vlm2vla_edge.runtime.action_text import metres_text_in_cm

_OBJECT_SENTENCE = re.compile(r"(?:^|\.\s+)([a-z][a-z0-9 '-]*?)\s+(?:on|in)\s+the\s+")


def scene_object_names(scene: str) -> tuple[str, ...]:
    """The objects a scene text names, in order of appearance; empty for a text in another format."""
    names: list[str] = []
    for match in _OBJECT_SENTENCE.finditer(scene):
        name = match.group(1)
        if name != "gripper" and name not in names:
            names.append(name)
    return tuple(names)


_TUPLE = re.compile(r"\(([^()]*)\)")
_DECIMAL = re.compile(r"(?<![\w.])-?[0-9]+(?:\.[0-9]+)?(?![\w.])")


def scene_in_units(scene: str, units: Literal["m", "cm"]) -> str:
    """The scene text with the numbers of its coordinate tuples written in `units`.

    Scene sources report metres ("above (-0.24, -0.02, -0.26)"). A model whose action language writes
    centimetres reads them in centimetres too ("above (-24, -2, -26)"), so it copies numbers instead of
    converting them, and each costs 1-3 tokens instead of 3-5. The decimal point moves exactly
    (`metres_text_in_cm`): the stated offsets stay the ones the labeller and the verifier compute.
    Text outside parentheses (object names, "gripper open") is left as it is.
    """
    if units == "m":
        return scene
    if units != "cm":
        raise ValueError(f"units must be m or cm, got {units!r}")
    return _TUPLE.sub(
        lambda t: "(" + _DECIMAL.sub(lambda n: metres_text_in_cm(n.group()), t.group(1)) + ")", scene
    )
