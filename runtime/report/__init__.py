"""One self-contained HTML page per episode: what the robot saw, planned, did, and how it ended.

A person debugging a run wants to look, not read logs: the frames before and after each attempt,
the plan and action texts, what the safety limiter changed, what the verifier decided, and where
the end effector went. The page is built from the episode folder alone (EPISODE_FORMAT.md), so it
works for runtime episodes, simulator demonstrations, imported datasets and crashed runs alike.

Why it is built this way:

- **Offline and self-contained.** Robots and the laptops next to them often have no network: the
  frames are inlined as `data:` URIs (the recorded JPEG bytes, never re-encoded), the path plot is
  inline SVG, the style is inline CSS, and there is no JavaScript at all. A Content-Security-Policy
  forbids scripts and remote loads, so a page that is mailed around cannot phone home.
- **Model output is hostile input.** The page comes from Jinja2 templates with autoescaping on, so
  every text from the model, the instruction or the files is escaped by the engine, never by hand;
  the CSP is a second line of defence should an escape ever be missed.
- **Any subset of stages.** A policy run writes subtasks/motion/action/verify records, a
  demonstration writes `demo` records, a crash leaves the last attempt half written: the page shows
  what is there and says what is missing rather than failing.
- **Bounded size.** Images are embedded up to a byte budget; long demonstrations get a sampled
  frame strip, so a 1000-step import does not produce a page a browser cannot open.

Modules, one job each: `grouping` (records into planning, attempts, demonstration), `units` (every
figure with its unit), `frames` (images inlined within a budget), `path` (plot geometry and the
robot's workspace), `svg` (the plot as typed nodes), `views` (what each part of the page shows),
`render` (templates, the public API).
"""

from vlm2vla_edge.runtime.report.render import REPORT_FILE, render_report, write_report

__all__ = ["REPORT_FILE", "render_report", "write_report"]
