"""Cloud first, local when the cloud cannot answer, and the verdict says which and why.

A robot must keep working when the link drops or the key is missing, so the runtime's verifier is
normally `FallbackVerifier(GeminiVerifier, HeuristicVerifier)`: no key, an open circuit, a timeout
or a bad answer sends the same request to the heuristic verifier, and the recorded verdict carries
`fallback_from="gemini"` and the (redacted) error. `make_verifier()` builds it from `VerifierConfig`,
whose defaults work offline.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field

from vlm2vla_edge.runtime.config import StrictModel
from vlm2vla_edge.runtime.errors import ConfigError
from vlm2vla_edge.runtime.verifier.base import Verdict, VerificationRequest, Verifier, cancelled_verdict
from vlm2vla_edge.runtime.verifier.credentials import load_api_key
from vlm2vla_edge.runtime.verifier.gemini import GeminiConfig, GeminiVerifier
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicConfig, HeuristicVerifier

log = logging.getLogger(__name__)


class VerifierConfig(StrictModel):
    """Which step verifier the runtime uses, and how."""

    kind: Literal["auto", "gemini", "heuristic"] = Field(
        "auto",
        description=(
            "auto: Gemini when an API key is found, else the heuristic verifier; gemini: Gemini, and a missing "
            "key is a configuration error; heuristic: local only, never touches the network."
        ),
    )
    fallback_on_error: bool = Field(
        True,
        description="With Gemini: answer from the heuristic verifier when the cloud fails (else a failed verdict).",
    )
    api_key_file: Path | None = Field(
        None, description="File holding the Gemini API key (else systemd's credential, GEMINI_API_KEY, GOOGLE_API_KEY)."
    )
    gemini: GeminiConfig = Field(default_factory=GeminiConfig, description="The cloud verifier's call settings.")
    heuristic: HeuristicConfig = Field(default_factory=HeuristicConfig, description="The local verifier's thresholds.")


class FallbackVerifier(Verifier):
    """Asks `primary`; when it is unavailable or its verdict carries an error, asks `fallback` instead."""

    def __init__(self, primary: Verifier, fallback: Verifier) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = f"{primary.name}|{fallback.name}"
        self._last_unavailable: str | None = None

    def unavailable_reason(self) -> str | None:
        return self.fallback.unavailable_reason()

    def redact(self, text: str) -> str:
        return self.fallback.redact(self.primary.redact(text))

    def verify(self, request: VerificationRequest, cancel: threading.Event | None = None) -> Verdict:
        start = time.perf_counter()
        if cancel is not None and cancel.is_set():
            return cancelled_verdict(self.name, 0.0, attempts=0)
        primary_attempts = 0
        error = self.primary.unavailable_reason()
        if error is None:
            self._last_unavailable = None
            try:
                verdict = self.primary.verify(request, cancel)
            except Exception as exc:  # noqa: BLE001 - a verifier should not raise; if one does, the robot still goes on
                error = self.redact(f"{type(exc).__name__}: {exc}")[:300]
                log.warning("event=verify verifier=%s outcome=exception error=%s", self.primary.name, error)
            else:
                if verdict.cancelled or verdict.error is None:
                    return verdict
                error, primary_attempts = verdict.error, verdict.attempts
        elif error != self._last_unavailable:  # a lasting condition (no key): say it once, not every step
            self._last_unavailable = error
            log.info("event=verifier_unavailable verifier=%s fallback=%s reason=%s", self.primary.name,
                        self.fallback.name, error)
        result = self.fallback.verify(request, cancel)
        return dataclasses.replace(
            result,
            latency_s=time.perf_counter() - start,
            attempts=primary_attempts + result.attempts,
            fallback_from=self.primary.name,
            error=self.redact(error),
        )


def make_verifier(config: VerifierConfig | None = None, environ: Mapping[str, str] | None = None) -> Verifier:
    """The verifier `config` asks for; raises `ConfigError` only for kind 'gemini' without a key or SDK."""
    config = config or VerifierConfig()
    heuristic = HeuristicVerifier(config.heuristic)
    if config.kind == "heuristic":
        return heuristic
    key = load_api_key(config.api_key_file, os.environ if environ is None else environ)
    gemini = GeminiVerifier(config.gemini, key)
    if config.kind == "gemini":
        unavailable = gemini.unavailable_reason()
        if unavailable is not None:
            raise ConfigError(f"verifier kind 'gemini' cannot start: {unavailable}")
    gemini.prepare()
    log.info("event=verifier_config kind=%s key=%s model=%s", config.kind, key, config.gemini.model)
    if config.kind == "gemini" and not config.fallback_on_error:
        return gemini
    return FallbackVerifier(gemini, heuristic)
