"""Step verifiers: did the current subtask succeed after the executed chunk? (cloud Gemini, local heuristics)."""

from vlm2vla_edge.runtime.verifier.base import GripperChange, Verdict, VerificationRequest, Verifier
from vlm2vla_edge.runtime.verifier.credentials import ApiKey, load_api_key, redact
from vlm2vla_edge.runtime.verifier.fallback import FallbackVerifier, VerifierConfig, make_verifier
from vlm2vla_edge.runtime.verifier.gemini import CircuitBreaker, GeminiConfig, GeminiVerifier
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicConfig, HeuristicVerifier, SubtaskKind, classify_subtask

__all__ = [
    "ApiKey",
    "CircuitBreaker",
    "FallbackVerifier",
    "GeminiConfig",
    "GeminiVerifier",
    "GripperChange",
    "HeuristicConfig",
    "HeuristicVerifier",
    "SubtaskKind",
    "VerificationRequest",
    "Verdict",
    "Verifier",
    "VerifierConfig",
    "classify_subtask",
    "load_api_key",
    "make_verifier",
    "redact",
]
