"""Access at CI scale: socket mode and group, the TCP bearer token, and the Gemini key leak scan."""

from __future__ import annotations

import hmac

import pytest

from reliability_suite.access import _recording_compare_digest, check_socket_access, check_tcp_token, scan_key_leaks


def test_socket_mode_group_and_path_checks() -> None:
    tally = check_socket_access()
    assert tally.failures == [] and tally.tried >= 10


def test_tcp_needs_the_right_token_compared_in_constant_time() -> None:
    tally = check_tcp_token()
    assert tally.failures == [] and tally.tried >= 11


def test_the_compare_digest_probe_sees_calls_and_restores() -> None:
    original = hmac.compare_digest
    with _recording_compare_digest() as calls:
        assert hmac.compare_digest(b"a", b"a") and not hmac.compare_digest(b"a", b"bb")
    assert calls == [(1, 1), (1, 2)] and hmac.compare_digest is original


@pytest.mark.slow
def test_the_gemini_key_appears_nowhere() -> None:
    """A daemon with a key and a Gemini server that fails, echoes headers and quotes the key back."""
    tally = scan_key_leaks(tasks=1)
    assert tally.failures == [] and tally.tried >= 10
