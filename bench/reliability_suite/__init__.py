"""Reliability suites run by `bench/reliability.py`: fault injection, fuzzing, load and access checks."""

from .tally import Tally

__all__ = ["Tally"]
