"""Exception hierarchy shared by the runtime, the tools and the CLI.

The CLI maps `UserError` (and subclasses) to exit code 2 with a one-sentence message and no traceback:
a bad path, a bad config or a bad instruction is the user's to fix, not a crash.
"""

from __future__ import annotations

from vlm2vla_edge.grammars import GrammarError as LanguageGrammarError


class Vlm2VlaError(Exception):
    """Base class of every error this project raises on purpose."""


class UserError(Vlm2VlaError):
    """A mistake the user can fix (bad input, bad config, missing file); CLI exit code 2."""


class ConfigError(UserError):
    """A configuration file is missing, unreadable or invalid; the message names file, field and range."""


class GrammarError(Vlm2VlaError, LanguageGrammarError):
    """A grammar failed in the runtime (does not compile, or the matcher cannot start): one of our errors,
    so the runner records it and the CLI exits 1, and still a `grammars.GrammarError` for callers that
    catch the language package's own error."""
