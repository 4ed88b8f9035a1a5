"""Camera image and text description of the simulated tabletop, without GL (numpy + PIL).

The camera is a pinhole placed like BridgeData's over-the-shoulder camera: behind and above the
robot, to one side, looking down at the table. Objects are drawn as shaded extruded ellipses
(side darker, top in the object's own colour, which the tests look for), the arm as thick segments
between its joints from forward kinematics, the gripper as two fingers, open or closed, and a
shadow under the gripper so that height can be judged from a single image. Painter's algorithm,
drawn at twice the size and box-filtered down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlm2vla_edge.runtime.action_text import format_number, rounded_offset
from vlm2vla_edge.runtime.actions import Vec3
from vlm2vla_edge.runtime.robot.base import ArmState
from vlm2vla_edge.runtime.robot.kinematics import fk, link_points
from vlm2vla_edge.runtime.sim.scene import KeyPoints, ObjectKind, Scene, SceneObject

TABLE_RGB = (176, 146, 108)
SHADOW_RGB = (128, 104, 76)
WALL_RGB = (206, 210, 214)
ARM_RGB = (38, 38, 44)
FINGER_RGB = (150, 150, 160)
_SUPERSAMPLE = 2
_ELLIPSE_POINTS = 28


@dataclass(frozen=True, slots=True)
class PinholeCamera:
    """A pinhole camera at `position` looking at `target` (z up), `fov_deg` horizontal field of view."""

    position: Vec3 = (-0.20, -0.22, 0.68)
    target: Vec3 = (0.33, 0.02, 0.02)
    fov_deg: float = 50.0
    width: int = 256
    height: int = 256
    near_m: float = 0.02

    def with_size(self, width: int, height: int) -> "PinholeCamera":
        return PinholeCamera(self.position, self.target, self.fov_deg, width, height, self.near_m)

    def _basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        forward = np.subtract(self.target, self.position).astype(float)
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, (0.0, 0.0, 1.0))
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        return forward, right, down

    @property
    def focal_px(self) -> float:
        return (self.width / 2) / math.tan(math.radians(self.fov_deg) / 2)

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """N x 3 base-frame points to N x 3 camera coordinates (right, down, depth)."""
        forward, right, down = self._basis()
        d = np.asarray(points, dtype=float).reshape(-1, 3) - np.asarray(self.position)
        return np.stack([d @ right, d @ down, d @ forward], axis=1)

    def project(self, points: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (N x 2, u right, v down, pixel centres at +0.5) and depths (N) of points."""
        cam = self.to_camera(np.asarray(points, dtype=float))
        depth = cam[:, 2]
        f = self.focal_px
        safe = np.where(depth > 1e-9, depth, 1e-9)
        uv = np.stack([self.width / 2 + f * cam[:, 0] / safe, self.height / 2 + f * cam[:, 1] / safe], axis=1)
        return uv, depth

    def project_point(self, point: Sequence[float]) -> tuple[float, float]:
        uv, _ = self.project(np.asarray(point, dtype=float).reshape(1, 3))
        return float(uv[0, 0]), float(uv[0, 1])


@dataclass(frozen=True, slots=True)
class ArmView:
    """What the renderer needs of the arm."""

    joints: tuple[float, ...]
    gripper_open: bool
    finger_gap_m: float | None = None  # None: fully open or closed; else the width of a held object


# --- geometry helpers ------------------------------------------------------------------------------


def ellipse_ring(obj: SceneObject, z: float, n: int = _ELLIPSE_POINTS) -> np.ndarray:
    """n x 3 points on the footprint ellipse of `obj` at height z."""
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    a, b = obj.kind.semi_major_m, obj.kind.semi_minor_m
    c, s = math.cos(obj.yaw), math.sin(obj.yaw)
    u, v = a * np.cos(t), b * np.sin(t)
    x = obj.position[0] + c * u - s * v
    y = obj.position[1] + s * u + c * v
    return np.stack([x, y, np.full(n, z)], axis=1)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain on 2-D points; returns the hull in order."""
    pts = sorted(set(map(tuple, np.round(points, 3))))
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _clip_near(cam_pts: np.ndarray, near: float) -> np.ndarray:
    """Clip a polygon (camera coordinates) against the plane depth = near (Sutherland-Hodgman)."""
    out: list[np.ndarray] = []
    n = len(cam_pts)
    for i in range(n):
        a, b = cam_pts[i], cam_pts[(i + 1) % n]
        a_in, b_in = a[2] >= near, b[2] >= near
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (near - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out).reshape(-1, 3)


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in rgb)  # type: ignore[return-value]


# --- the renderer ----------------------------------------------------------------------------------


class Renderer:
    """Draws a scene and an arm from one camera. Stateless apart from the camera."""

    def __init__(self, camera: PinholeCamera | None = None) -> None:
        self.camera = camera or PinholeCamera()
        self._big = self.camera.with_size(self.camera.width * _SUPERSAMPLE, self.camera.height * _SUPERSAMPLE)

    def _poly(self, draw: ImageDraw.ImageDraw, world_pts: np.ndarray, rgb: tuple[int, int, int]) -> None:
        cam = _clip_near(self._big.to_camera(world_pts), self._big.near_m)
        if len(cam) < 3:
            return
        f = self._big.focal_px
        uv = np.stack(
            [self._big.width / 2 + f * cam[:, 0] / cam[:, 2], self._big.height / 2 + f * cam[:, 1] / cam[:, 2]], axis=1
        )
        draw.polygon([(float(u), float(v)) for u, v in uv], fill=rgb)

    def _solid(self, draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
        bottom = ellipse_ring(obj, obj.position[2])
        top = ellipse_ring(obj, obj.top_z)
        uv, depth = self._big.project(np.concatenate([bottom, top]))
        if np.any(depth <= self._big.near_m):
            return
        side = _shade(obj.kind.colour, 0.62)
        hull = _convex_hull(uv)
        draw.polygon([(float(u), float(v)) for u, v in hull], fill=side)
        top_uv = uv[len(bottom) :]
        draw.polygon([(float(u), float(v)) for u, v in top_uv], fill=obj.kind.colour)
        if obj.kind.container == "in":
            # A rim: the inner surface a little darker than the top ring, so pans and bowls read as hollow.
            inner = SceneObject(kind=obj.kind, position=obj.position, yaw=obj.yaw)
            ring = ellipse_ring(inner, obj.top_z) - np.array([obj.position[0], obj.position[1], 0.0])
            ring[:, :2] *= 0.82
            ring += np.array([obj.position[0], obj.position[1], 0.0])
            iuv, _ = self._big.project(ring)
            draw.polygon([(float(u), float(v)) for u, v in iuv], fill=_shade(obj.kind.colour, 0.8))

    def _segment(
        self, draw: ImageDraw.ImageDraw, a: np.ndarray, b: np.ndarray, width_m: float, rgb: tuple[int, int, int]
    ) -> None:
        uv, depth = self._big.project(np.stack([a, b]))
        if np.any(depth <= self._big.near_m):
            return
        px = max(1, int(round(self._big.focal_px * width_m / float(depth.mean()))))
        pts = [(float(uv[0, 0]), float(uv[0, 1])), (float(uv[1, 0]), float(uv[1, 1]))]
        draw.line(pts, fill=rgb, width=px)
        r = px / 2
        for u, v in pts:
            draw.ellipse([u - r, v - r, u + r, v + r], fill=rgb)

    def _arm_parts(self, arm: ArmView) -> list[tuple[float, str, tuple]]:
        """Arm drawing jobs with their depth: links, then the two fingers of the gripper."""
        pts = link_points(arm.joints)
        T = fk(arm.joints)
        tool_x, tool_y = T[:3, 0], T[:3, 1]
        ee = T[:3, 3]
        jobs: list[tuple[float, str, tuple]] = []
        widths = (0.04, 0.032, 0.028, 0.024)
        for i, w in enumerate(widths):
            a, b = pts[i], pts[i + 1] - (tool_x * 0.05 if i == 3 else 0.0)
            depth = float(self._big.project(np.stack([a, b]))[1].mean())
            jobs.append((depth, "segment", (a, b, w, ARM_RGB)))
        if arm.finger_gap_m is not None:
            half = arm.finger_gap_m / 2 + 0.006
        else:
            half = 0.037 if arm.gripper_open else 0.012
        palm = ee - tool_x * 0.05
        for sign in (-1.0, 1.0):
            base = palm + sign * tool_y * half
            tip = ee + sign * tool_y * half
            depth = float(self._big.project(np.stack([base, tip]))[1].mean())
            jobs.append((depth, "segment", (palm, base, 0.012, FINGER_RGB)))
            jobs.append((depth, "segment", (base, tip, 0.012, FINGER_RGB)))
        return jobs

    def render(self, scene: Scene, arm: ArmView | None = None) -> np.ndarray:
        """H x W x 3 uint8 RGB image of the scene (and the arm, when given)."""
        big = self._big
        image = Image.new("RGB", (big.width, big.height), WALL_RGB)
        draw = ImageDraw.Draw(image)
        tz = scene.region.table_z
        table = np.array([[-0.12, -0.50, tz], [0.70, -0.50, tz], [0.70, 0.50, tz], [-0.12, 0.50, tz]])
        self._poly(draw, table, TABLE_RGB)
        # Shadows on the table: under the gripper and under anything held (straight down).
        if arm is not None:
            ee = fk(arm.joints)[:3, 3]
            shadow = SceneObject(kind=_SHADOW_KIND, position=(float(ee[0]), float(ee[1]), tz))
            self._poly(draw, ellipse_ring(shadow, tz + 0.0005), SHADOW_RGB)
        if scene.held is not None:
            held = scene.objects[scene.held]
            flat = SceneObject(kind=held.kind, position=(held.position[0], held.position[1], tz), yaw=held.yaw)
            self._poly(draw, ellipse_ring(flat, tz + 0.0005), SHADOW_RGB)
        # Containers first (they lie under things), then items and arm parts far to near.
        containers = [o for o in scene.objects.values() if o.kind.container is not None]
        for obj in sorted(containers, key=lambda o: -self._depth(o)):
            self._solid(draw, obj)
        jobs: list[tuple[float, str, tuple]] = [
            (self._depth(o), "solid", (o,)) for o in scene.objects.values() if o.kind.container is None
        ]
        if arm is not None:
            base = SceneObject(kind=_BASE_KIND, position=(0.0, 0.0, tz))
            jobs.append((self._depth(base), "solid", (base,)))
            jobs.extend(self._arm_parts(arm))
        for _, what, args in sorted(jobs, key=lambda j: -j[0]):
            if what == "solid":
                self._solid(draw, *args)
            else:
                self._segment(draw, *args)
        small = image.reduce(_SUPERSAMPLE)
        return np.asarray(small, dtype=np.uint8).copy()

    def _depth(self, obj: SceneObject) -> float:
        return float(self._big.project(np.asarray(obj.centre).reshape(1, 3))[1][0])


_SHADOW_KIND = ObjectKind("shadow", SHADOW_RGB, 0.022, 0.022, 0.0)
_BASE_KIND = ObjectKind("robot base", ARM_RGB, 0.045, 0.045, 0.06)


def save_png(image: np.ndarray, path: str) -> None:
    Image.fromarray(image).save(path, format="PNG")


# --- text ------------------------------------------------------------------------------------------


#: Decimals of the offsets in the scene text: the action language's metres at centimetre resolution, so a
#: policy can copy an offset into its plan and its action chunk digit for digit.
SCENE_DECIMALS = 2


def _offset(point: tuple[float, float, float], gripper: tuple[float, float, float]) -> str:
    """The offset as the labeller states waypoint targets (`rounded_offset`), so the two match digit for digit."""
    return (
        "(" + ", ".join(format_number(v, SCENE_DECIMALS) for v in rounded_offset(gripper, point, SCENE_DECIMALS)) + ")"
    )


def describe(scene: Scene, arm_state: ArmState, points: KeyPoints = KeyPoints()) -> str:
    """A short, deterministic text of the scene for text-only models (offsets in metres, base frame).

    It is what a perception stack could report, and the same whatever the task: the gripper's state,
    then per object (by name) what it rests on and the offsets from the gripper to its key points
    (`KeyPoints`: `above` for every object that is not held, `grasp` for graspable ones). Offsets rather
    than positions, so a small text model reads the move instead of subtracting coordinates.
    """
    gripper = arm_state.position
    held = scene.held
    state = "open" if arm_state.gripper_open else "closed"
    holding = f"holding the {held}" if held is not None else "holding nothing"
    table = scene.region.table_z
    lines = [f"gripper {state}, {holding}."]
    for name in sorted(scene.objects):
        obj = scene.objects[name]
        if name == held:
            lines.append(f"{name} in the gripper.")
            continue
        if obj.support is not None:
            where = f"{scene.objects[obj.support].kind.container or 'on'} the {obj.support}"
        else:
            where = "on the table"
        text = f"{name} {where}: above {_offset(points.above(obj, table), gripper)}"
        if obj.kind.graspable:
            text += f", grasp {_offset(points.grasp(obj, table), gripper)}"
        lines.append(text + ".")
    return " ".join(lines)
