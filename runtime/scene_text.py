"""Reading the text observation of a text-only policy: the scene description a perception stack reports.

The format is the simulator's `sim.render.describe` (the same text for every task): "gripper open, holding
nothing." then one sentence per object, "<name> on the table: above (...), grasp (...)." / "<name> in the
pot: ..." / "<name> in the gripper.". This module reads it without importing the simulator, so the
robot-side policy can use it (tests/test_layers.py) on any source of that text.
"""

from __future__ import annotations

import re

_OBJECT_SENTENCE = re.compile(r"(?:^|\.\s+)([a-z][a-z0-9 '-]*?)\s+(?:on|in)\s+the\s+")


def scene_object_names(scene: str) -> tuple[str, ...]:
    """The objects a scene text names, in order of appearance; empty for a text in another format."""
    names: list[str] = []
    for match in _OBJECT_SENTENCE.finditer(scene):
        name = match.group(1)
        if name != "gripper" and name not in names:
            names.append(name)
    return tuple(names)
