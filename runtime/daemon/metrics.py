"""Prometheus metrics of the daemon, in the text exposition format (no client library needed).

`DaemonMetrics` is an episode subscriber: it counts outcomes, stage latencies, safety clamps and
rejections and verifier fallbacks from the loop's events, so the numbers come from the same source
as the recorded episode. Everything is guarded by one lock; rendering copies under it.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable

from vlm2vla_edge.runtime.runner import EpisodeResult, RunnerEvent

LabelKey = tuple[tuple[str, str], ...]

#: Seconds. Covers a 10 ms decode step up to a multi-minute episode.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    if not items:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in items) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Family:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_text, kind

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "counter")
        self.values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = float(value)


class Histogram(_Family):
    def __init__(self, name: str, help_text: str, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, "histogram")
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelKey, tuple[list[int], list[float]]] = {}  # key -> (bucket counts, [sum, count])

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts, totals = self.series.setdefault(key, ([0] * len(self.buckets), [0.0, 0.0]))
        index = bisect.bisect_left(self.buckets, value)
        if index < len(counts):
            counts[index] += 1
        totals[0] += value
        totals[1] += 1

    def lines(self) -> list[str]:
        out = self.header()
        for key, (counts, (total, count)) in sorted(self.series.items()):
            running = 0
            for bound, n in zip(self.buckets, counts):
                running += n
                out.append(f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {running}")
            out.append(f"{self.name}_bucket{_labels(key, (('le', '+Inf'),))} {int(count)}")
            out.append(f"{self.name}_sum{_labels(key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(key)} {int(count)}")
        return out


class DaemonMetrics:
    """The daemon's counters; also an `EpisodeSubscriber` (quick, never raises into the loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.episodes = Counter("vlm2vla_episodes_total", "Episodes finished, by outcome.")
        self.episode_duration = Histogram("vlm2vla_episode_duration_seconds", "Wall time of whole episodes.")
        self.stage_latency = Histogram(
            "vlm2vla_stage_latency_seconds", "Latency of each loop stage (subtasks, motion, action, execute, verify)."
        )
        self.safety = Counter("vlm2vla_safety_decisions_total", "Safety limiter decisions that changed a command, by rule and verdict (clamp or reject).")
        self.rejected_chunks = Counter("vlm2vla_safety_rejected_chunks_total", "Action chunks the limiter rejected (wholly or in part).")
        self.verdicts = Counter("vlm2vla_verifier_verdicts_total", "Verifier verdicts, by deciding verifier and result.")
        self.fallbacks = Counter("vlm2vla_verifier_fallbacks_total", "Verdicts decided by the fallback verifier, by the verifier that failed.")
        self.estops = Counter("vlm2vla_estops_total", "E-stop requests received.")
        self.requests = Counter("vlm2vla_http_requests_total", "API requests answered, by status code.")
        self.estop_engaged = Gauge("vlm2vla_estop_engaged", "1 while the e-stop is latched.")
        self.running = Gauge("vlm2vla_episode_running", "1 while an episode runs.")
        self._families: list[_Family] = [
            self.episodes, self.episode_duration, self.stage_latency, self.safety, self.rejected_chunks,
            self.verdicts, self.fallbacks, self.estops, self.requests, self.estop_engaged, self.running,
        ]

    # --- subscriber ----------------------------------------------------------------------------

    def on_event(self, event: RunnerEvent) -> None:
        with self._lock:
            if event.kind == "episode_start":
                self.running.set(1)
            elif event.kind == "safety":
                verdict = event.data["verdict"]
                for decision in verdict.decisions:  # holds every command's own decisions too
                    if decision.verdict != "pass":
                        self.safety.inc(rule=decision.rule, verdict=str(decision.verdict))
                if verdict.rejected:
                    self.rejected_chunks.inc()
            elif event.kind == "verified":
                verdict = event.data["verdict"]
                if verdict.verifier != "runner":  # the runner's own "unusable output" verdicts are not verifier calls
                    self.verdicts.inc(verifier=verdict.verifier, success=str(bool(verdict.success)).lower())
                if verdict.fallback_from:
                    self.fallbacks.inc(**{"from": verdict.fallback_from})
            elif event.kind == "episode_end":
                result: EpisodeResult = event.data["result"]
                self.running.set(0)
                self.episodes.inc(outcome=result.outcome)
                self.episode_duration.observe(result.duration_s)
                for stage, values in result.stage_latency_s.items():
                    for value in values:
                        self.stage_latency.observe(value, stage=stage)

    # --- from the API --------------------------------------------------------------------------

    def count_request(self, status: int) -> None:
        with self._lock:
            self.requests.inc(code=str(status))

    def count_estop(self) -> None:
        with self._lock:
            self.estops.inc()

    def render(self, estop_engaged: bool) -> str:
        """The whole exposition, one family after another, ending with a newline."""
        with self._lock:
            self.estop_engaged.set(1 if estop_engaged else 0)
            lines: list[str] = []
            for family in self._families:
                lines.extend(family.lines())
        return "\n".join(lines) + "\n"
