"""The page: the episode's views put into the Jinja2 templates, with autoescaping on for every value.

The templates ship inside the package (`templates/`, package data), so an installed wheel renders the
same page as a checkout. `StrictUndefined` turns a misspelt name in a template into an error in the
tests instead of an empty spot on a robot's report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.files import atomic_write
from vlm2vla_edge.runtime.report import timeline, views
from vlm2vla_edge.runtime.report.frames import FrameEmbedder
from vlm2vla_edge.runtime.report.grouping import EpisodeView
from vlm2vla_edge.runtime.report.path import robot_config_for, workspace_box
from vlm2vla_edge.runtime.report.units import Units

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader(__package__ or "vlm2vla_edge.runtime.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    template: str


def render_report(reader: EpisodeReader, robot: RobotConfig | None = None) -> str:
    """The report page for an episode as one HTML string.

    `robot` draws its workspace box in the path plot; by default the packaged robot preset named
    in the episode's meta is used when there is one, else the axes fit the data.
    """
    meta = reader.meta
    view = EpisodeView.build(reader)
    units = Units.of(meta.action_units)
    frames = FrameEmbedder(reader)
    box = workspace_box(robot if robot is not None else robot_config_for(meta.robot_name), meta.action_units)
    context: dict[str, object] = {"units": units, "header": views.header(view, frames)}
    sections = []
    if view.planning or view.attempts:  # in page order: frames are embedded (and budgeted) in that order
        sections.append(Section("timeline", "Subtasks", "timeline.html.j2"))
        context["timeline"] = timeline.timeline(view, frames, units)
    if view.demo:
        sections.append(Section("demo", f"Demonstration steps ({len(view.demo)})", "demo.html.j2"))
        context["demo"] = views.demo(view.demo, frames, units)
    sections.append(Section("path", "End-effector path", "path.html.j2"))
    context["path"] = views.path_part(view.steps, box, units)
    figures = views.figure_tables(view)
    if figures is not None:
        sections.append(Section("latency", "Latency by stage", "figures.html.j2"))
        context["figures"] = figures
    if view.other:
        sections.append(Section("other", f"Other records ({len(view.other)})", "other.html.j2"))
        context["other"] = views.other_rows(view.other)
    return environment().get_template("page.html.j2").render(
        context,
        title=f"{meta.instruction} — {reader.outcome} — episode {reader.episode_id}",
        sections=sections,
        episode_path=str(reader.path),
        records=len(view.steps),
        embedded_kb=frames.embedded // 1024,
        missing_frames=len(frames.missing),
    )


def write_report(episode_dir: Path, out: Path | None = None) -> Path:
    """Write the episode's report (default `episode_dir/report.html`) atomically and return its path.

    Raises `UserError` when `episode_dir` is not a readable episode or the report cannot be written.
    """
    episode_dir = Path(episode_dir)
    reader = EpisodeReader(episode_dir)  # EpisodeFormatError (a UserError) for a folder that is not an episode
    page = render_report(reader)
    target = Path(out) if out is not None else episode_dir / REPORT_FILE
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, page.encode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot write the report {target}: {exc.strerror or exc}") from exc
    log.info("event=report_written episode=%s path=%s bytes=%d", reader.episode_id, target, len(page))
    return target
