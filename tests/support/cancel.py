"""A deterministic stop button for cancellation tests."""

from __future__ import annotations

import threading


class CountdownEvent(threading.Event):
    """An event that sets itself on its n-th check: cancels exactly where a test wants (after the prompt,
    after the k-th batch), whatever the machine's speed. `checks` counts how often it was asked."""

    def __init__(self, checks_before_set: int) -> None:
        super().__init__()
        self.remaining = checks_before_set
        self.checks = 0

    def is_set(self) -> bool:
        self.checks += 1
        self.remaining -= 1
        if self.remaining < 0:
            self.set()
        return super().is_set()
