"""Prometheus metrics of the daemon, through `prometheus_client` (the exposition format is the library's).

`DaemonMetrics` is an episode subscriber: it counts outcomes, stage latencies, safety clamps and
rejections and verifier fallbacks from the loop's events, so the numbers come from the same source
as the recorded episode. Each `DaemonMetrics` owns its own `CollectorRegistry` rather than the
library's process-global one, so several daemons in one process (tests, benchmarks) never collide.
prometheus_client's metrics are thread-safe; `on_event` stays quick and never raises into the loop.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vlm2vla_edge.runtime.events import EpisodeEnded, EpisodeStarted, LoopEventHandler, SafetyChecked, StepVerified

#: Seconds. Covers a 10 ms decode step up to a multi-minute episode.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: The Content-Type of `render()`'s text (the format version prometheus_client writes).
CONTENT_TYPE = CONTENT_TYPE_LATEST


class DaemonMetrics(LoopEventHandler):
    """The daemon's counters; also an episode subscriber (typed handlers of the loop's events)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.episodes = Counter("vlm2vla_episodes_total", "Episodes finished, by outcome.", ["outcome"], registry=r)
        self.episode_duration = Histogram(
            "vlm2vla_episode_duration_seconds", "Wall time of whole episodes.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_latency = Histogram(
            "vlm2vla_stage_latency_seconds", "Latency of each loop stage (subtasks, motion, action, execute, verify).",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.safety = Counter(
            "vlm2vla_safety_decisions_total",
            "Safety limiter decisions that changed a command, by rule and verdict (clamp or reject).",
            ["rule", "verdict"], registry=r,
        )
        self.rejected_chunks = Counter(
            "vlm2vla_safety_rejected_chunks_total", "Action chunks the limiter rejected (wholly or in part).",
            registry=r,
        )
        self.verdicts = Counter(
            "vlm2vla_verifier_verdicts_total", "Verifier verdicts, by deciding verifier and result.",
            ["verifier", "success"], registry=r,
        )
        self.fallbacks = Counter(
            "vlm2vla_verifier_fallbacks_total",
            "Verdicts decided by the fallback verifier, by the verifier that failed.",
            ["from"], registry=r,
        )
        self.estops = Counter("vlm2vla_estops_total", "E-stop requests received.", registry=r)
        self.requests = Counter(
            "vlm2vla_http_requests_total", "API requests answered, by status code.", ["code"], registry=r
        )
        self.estop_engaged = Gauge("vlm2vla_estop_engaged", "1 while the e-stop is latched.", registry=r)
        self.running = Gauge("vlm2vla_episode_running", "1 while an episode runs.", registry=r)
        self.adapter = Gauge(
            "vlm2vla_adapter_active", "1 for the LoRA adapter (skill) applied now, 0 for the bundle's others.",
            ["adapter"], registry=r,
        )
        self.adapter_switches = Counter(
            "vlm2vla_adapter_switches_total", "Switches to each LoRA adapter between tasks.", ["adapter"], registry=r
        )
        self.adapter_switch = Histogram(
            "vlm2vla_adapter_switch_seconds", "Time of one adapter switch (the base stays loaded).",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    # --- subscriber ----------------------------------------------------------------------------

    def on_episode_started(self, event: EpisodeStarted) -> None:
        self.running.set(1)

    def on_safety_checked(self, event: SafetyChecked) -> None:
        verdict = event.verdict
        for decision in verdict.decisions:  # holds every command's own decisions too
            if decision.verdict != "pass":
                self.safety.labels(rule=decision.rule, verdict=str(decision.verdict)).inc()
        if verdict.rejected:
            self.rejected_chunks.inc()

    def on_step_verified(self, event: StepVerified) -> None:
        verdict = event.verdict
        if verdict.verifier != "runner":  # the runner's own "unusable output" verdicts are not verifier calls
            self.verdicts.labels(verifier=verdict.verifier, success=str(bool(verdict.success)).lower()).inc()
        if verdict.fallback_from:
            self.fallbacks.labels(**{"from": verdict.fallback_from}).inc()

    def on_episode_ended(self, event: EpisodeEnded) -> None:
        result = event.result
        self.running.set(0)
        self.episodes.labels(outcome=result.outcome).inc()
        self.episode_duration.observe(result.duration_s)
        for stage, values in result.stage_latency_s.items():
            for value in values:
                self.stage_latency.labels(stage=stage).observe(value)

    # --- from the API --------------------------------------------------------------------------

    def count_request(self, status: int) -> None:
        self.requests.labels(code=str(status)).inc()

    def count_estop(self) -> None:
        self.estops.inc()

    def adapter_applied(self, active: str, loaded: tuple[str, ...], switch_s: float | None = None) -> None:
        """The adapter now applied (of those `loaded`); `switch_s` when a switch just took that long."""
        for name in loaded:
            self.adapter.labels(adapter=name).set(1 if name == active else 0)
        if switch_s is not None:
            self.adapter_switches.labels(adapter=active).inc()
            self.adapter_switch.observe(switch_s)

    def render(self, estop_engaged: bool) -> bytes:
        """The whole exposition (`CONTENT_TYPE`), with the e-stop gauge read now."""
        self.estop_engaged.set(1 if estop_engaged else 0)
        return generate_latest(self.registry)
