"""A tabletop with named objects: placement by seed, grasping, carrying and dropping.

Objects are upright extruded ellipses (a footprint with two semi-axes and a yaw, and a height);
that is enough to tell a carrot from a plate in a picture and to decide, with simple geometry,
what the closed gripper holds and where a released object comes to rest. Containers (pan, bowl,
plate, ...) are not graspable; an object released above one lands on its surface, otherwise on
the table. Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal

import numpy as np

from vlm2vla_edge.runtime.actions import Vec3

Relation = Literal["in", "on"]


@dataclass(frozen=True, slots=True)
class ObjectKind:
    """What an object is: its size, colour and role."""

    name: str
    colour: tuple[int, int, int]  # RGB of the top face in the camera image
    semi_major_m: float  # footprint half-length along the object's yaw
    semi_minor_m: float  # footprint half-width
    height_m: float
    container: Relation | None = None  # "in" (pan, bowl) or "on" (plate, towel); None: a graspable item
    surface_m: float = 0.0  # for containers: height of the surface an object rests on, above the bottom

    @property
    def graspable(self) -> bool:
        return self.container is None

    @property
    def radius_m(self) -> float:
        """Radius of the circle that bounds the footprint (used for spacing)."""
        return self.semi_major_m


# The catalogue. Colours are distinct from each other and from the table, wall and arm (at least 30 apart
# in some channel) so that the image tests can find an object by its colour, and so that a vision model
# can tell them apart.
CATALOGUE: dict[str, ObjectKind] = {
    k.name: k
    for k in (
        ObjectKind("carrot", (237, 118, 20), 0.045, 0.012, 0.024),
        ObjectKind("eggplant", (96, 40, 120), 0.045, 0.020, 0.035),
        ObjectKind("fish", (70, 150, 200), 0.040, 0.016, 0.020),
        ObjectKind("banana", (250, 220, 50), 0.045, 0.014, 0.025),
        ObjectKind("spoon", (170, 175, 195), 0.040, 0.010, 0.012),
        ObjectKind("cup", (220, 40, 60), 0.025, 0.025, 0.060),
        ObjectKind("corn", (245, 190, 90), 0.040, 0.016, 0.030),
        ObjectKind("mushroom", (160, 82, 50), 0.020, 0.020, 0.030),
        ObjectKind("lemon", (220, 245, 120), 0.022, 0.018, 0.035),
        ObjectKind("strawberry", (200, 20, 140), 0.016, 0.014, 0.022),
        ObjectKind("pan", (74, 76, 84), 0.075, 0.075, 0.035, container="in", surface_m=0.005),
        ObjectKind("pot", (120, 125, 140), 0.065, 0.065, 0.060, container="in", surface_m=0.008),
        ObjectKind("bowl", (40, 170, 110), 0.055, 0.055, 0.040, container="in", surface_m=0.006),
        ObjectKind("plate", (245, 245, 235), 0.065, 0.065, 0.012, container="on", surface_m=0.012),
        ObjectKind("towel", (90, 110, 210), 0.070, 0.055, 0.005, container="on", surface_m=0.005),
    )
}
ITEMS: tuple[str, ...] = tuple(n for n, k in CATALOGUE.items() if k.graspable)
CONTAINERS: tuple[str, ...] = tuple(n for n, k in CATALOGUE.items() if not k.graspable)


@dataclass(frozen=True, slots=True)
class TableRegion:
    """Where objects may be placed: inside the arm's comfortable reach, in the base frame (metres)."""

    x: tuple[float, float] = (0.18, 0.46)
    y: tuple[float, float] = (-0.22, 0.22)
    table_z: float = 0.0
    gap_m: float = 0.015  # free space between footprints


@dataclass(slots=True)
class SceneObject:
    """One object on the table: `position` is the centre of its bottom face in the base frame."""

    kind: ObjectKind
    position: Vec3
    yaw: float = 0.0
    support: str | None = None  # name of the container it rests in/on; None = on the table (or held)

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def top_z(self) -> float:
        return self.position[2] + self.kind.height_m

    @property
    def centre(self) -> Vec3:
        x, y, z = self.position
        return (x, y, z + self.kind.height_m / 2)

    def contains_xy(self, x: float, y: float, margin: float = 0.0) -> bool:
        """True when (x, y) lies inside the footprint ellipse grown by `margin`."""
        dx, dy = x - self.position[0], y - self.position[1]
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        u, v = c * dx + s * dy, -s * dx + c * dy
        a, b = self.kind.semi_major_m + margin, self.kind.semi_minor_m + margin
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0


@dataclass(frozen=True, slots=True)
class GraspRule:
    """When does the closing gripper hold an object: tip inside the footprint (grown by a margin) and
    between the object's bottom (plus a little) and a bit above its top."""

    margin_m: float = 0.015
    below_top_m: float = 0.002  # the tip must be at least this far into the object's height...
    above_top_m: float = 0.02  # ...or at most this far above its top (fingers reach down)


@dataclass(frozen=True, slots=True)
class KeyPoints:
    """Where a gripper goes to act on an object: the geometry a policy needs, as a perception would report it.

    `above` is the approach point: over the object's centre, `hover_above_m` over its top and at least
    `min_hover_m` over the table (for a container: where a held object is let go). `grasp` is the
    object's centre at half height (never below `min_grasp_z_m`, the lowest point the fingertips may
    reach). The scripted expert moves to exactly these points, and the scene text states them as offsets
    from the gripper, so a policy copies a point instead of computing it.
    """

    hover_above_m: float = 0.06
    min_hover_m: float = 0.10
    min_grasp_z_m: float = 0.021

    def above(self, obj: "SceneObject", table_z: float = 0.0) -> Vec3:
        x, y, _ = obj.position
        return (x, y, max(obj.top_z + self.hover_above_m, table_z + self.min_hover_m))

    def grasp(self, obj: "SceneObject", table_z: float = 0.0) -> Vec3:
        x, y, z = obj.position
        return (x, y, max(z + obj.kind.height_m / 2, table_z + self.min_grasp_z_m))


@dataclass(slots=True)
class Scene:
    """Objects on a table and what the gripper holds. Mutable: the world changes it as the arm acts."""

    objects: dict[str, SceneObject]
    region: TableRegion = field(default_factory=TableRegion)
    seed: int | None = None
    held: str | None = None
    _held_offset: Vec3 = (0.0, 0.0, 0.0)  # object position minus gripper tip at grasp time

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def random(
        cls,
        seed: int,
        required: Iterable[str] = (),
        n_distractors: int = 2,
        region: TableRegion | None = None,
    ) -> "Scene":
        """Objects `required` plus `n_distractors` others, placed without overlap; same seed, same scene."""
        region = region or TableRegion()
        rng = np.random.default_rng(seed)
        names = list(dict.fromkeys(required))
        for name in names:
            if name not in CATALOGUE:
                raise ValueError(f"unknown object '{name}'; known objects: {', '.join(sorted(CATALOGUE))}")
        pool = [n for n in CATALOGUE if n not in names]
        n_containers = sum(1 for n in names if n in CONTAINERS)
        extra: list[str] = []
        for name in rng.permutation(pool):
            if len(extra) >= n_distractors:
                break
            if name in CONTAINERS:  # at most two containers on the table: they take a lot of room
                if n_containers >= 2:
                    continue
                n_containers += 1
            extra.append(str(name))
        # When the table is too crowded, give up distractors (last drawn first), never required objects.
        while True:
            chosen = names + extra
            order = sorted(chosen, key=lambda n: -CATALOGUE[n].radius_m)  # big things first: hardest to fit
            for _ in range(50):
                placed = cls._try_place(order, rng, region)
                if placed is not None:
                    return cls(objects={n: placed[n] for n in chosen}, region=region, seed=seed)
            if not extra:
                raise ValueError(
                    f"cannot place {', '.join(names)} without overlap in the table region (seed {seed})"
                )
            extra.pop()

    @staticmethod
    def _try_place(order: list[str], rng: np.random.Generator, region: TableRegion) -> dict[str, SceneObject] | None:
        placed: dict[str, SceneObject] = {}
        for name in order:
            kind = CATALOGUE[name]
            r = kind.radius_m
            for _ in range(100):
                x = float(rng.uniform(region.x[0] + r, region.x[1] - r))
                y = float(rng.uniform(region.y[0] + r, region.y[1] - r))
                if all(
                    math.hypot(x - o.position[0], y - o.position[1]) >= r + o.kind.radius_m + region.gap_m
                    for o in placed.values()
                ):
                    yaw = (
                        float(rng.uniform(-math.pi / 2, math.pi / 2)) if kind.semi_major_m > kind.semi_minor_m else 0.0
                    )
                    placed[name] = SceneObject(kind=kind, position=(x, y, region.table_z), yaw=yaw)
                    break
            else:
                return None
        return placed

    def copy(self) -> "Scene":
        return Scene(
            objects={n: replace(o) for n, o in self.objects.items()},
            region=self.region,
            seed=self.seed,
            held=self.held,
            _held_offset=self._held_offset,
        )

    def only(self, *names: str) -> "Scene":
        """A copy holding just the named objects (for tests and pictures of single objects)."""
        return Scene(objects={n: replace(self.objects[n]) for n in names}, region=self.region, seed=self.seed)

    # --- physics (kinematic) ------------------------------------------------------------------

    def __getitem__(self, name: str) -> SceneObject:
        return self.objects[name]

    def grasp_candidate(self, tip: Vec3, rule: GraspRule = GraspRule()) -> str | None:
        """The graspable object the closing gripper at `tip` would hold (the nearest one), if any."""
        best: tuple[float, str] | None = None
        for obj in self.objects.values():
            if not obj.kind.graspable or obj.name == self.held:
                continue
            if not obj.contains_xy(tip[0], tip[1], rule.margin_m):
                continue
            if not (obj.position[2] + rule.below_top_m <= tip[2] <= obj.top_z + rule.above_top_m):
                continue
            dist = math.hypot(tip[0] - obj.position[0], tip[1] - obj.position[1])
            if best is None or dist < best[0]:
                best = (dist, obj.name)
        return None if best is None else best[1]

    def close_gripper(self, tip: Vec3) -> str | None:
        """Grasp what lies between the fingers; returns its name (None: closed on nothing)."""
        if self.held is not None:
            return self.held
        name = self.grasp_candidate(tip)
        if name is not None:
            obj = self.objects[name]
            self.held = name
            obj.support = None
            self._held_offset = (
                obj.position[0] - tip[0],
                obj.position[1] - tip[1],
                obj.position[2] - tip[2],
            )
        return name

    def follow(self, tip: Vec3) -> None:
        """Move the held object with the gripper tip."""
        if self.held is None:
            return
        off = self._held_offset
        obj = self.objects[self.held]
        obj.position = (tip[0] + off[0], tip[1] + off[1], tip[2] + off[2])

    def open_gripper(self) -> str | None:
        """Release the held object; it drops onto the container below its centre, else the table."""
        name = self.held
        if name is None:
            return None
        obj = self.objects[name]
        self.held = None
        x, y, _ = obj.position
        support = self.support_below(x, y, exclude=name)
        if support is None:
            obj.position = (x, y, self.region.table_z)
            obj.support = None
        else:
            base = self.objects[support]
            obj.position = (x, y, base.position[2] + base.kind.surface_m)
            obj.support = support
        return name

    def support_below(self, x: float, y: float, exclude: str | None = None) -> str | None:
        """The container whose footprint contains (x, y), if any (containers never overlap)."""
        for obj in self.objects.values():
            if obj.name != exclude and obj.kind.container is not None and obj.contains_xy(x, y):
                return obj.name
        return None

    def rests_in(self, item: str, container: str) -> bool:
        """Ground truth for 'put item in/on container': released, centre over the container, on its surface."""
        if self.held == item:
            return False
        obj, base = self.objects[item], self.objects[container]
        if not base.contains_xy(obj.position[0], obj.position[1]):
            return False
        return abs(obj.position[2] - (base.position[2] + base.kind.surface_m)) < 1e-6

    def lifted(self, item: str, min_height_m: float = 0.05) -> bool:
        """Ground truth for 'pick up item': held, with its bottom at least `min_height_m` above the table."""
        return self.held == item and self.objects[item].position[2] >= self.region.table_z + min_height_m
