"""Where the Gemini API key comes from, and how it is kept out of logs, errors and episodes.

Order: an explicit key file (config) > systemd's credential `$CREDENTIALS_DIRECTORY/gemini_api_key`
(`LoadCredential=` in the unit, so the key never sits in the unit file or the environment) >
`GEMINI_API_KEY` > `GOOGLE_API_KEY`. The key travels as an `ApiKey`, whose `repr`/`str` never show
it; only `reveal()` does, and only the HTTP client gets that value.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vlm2vla_edge.runtime.errors import ConfigError

log = logging.getLogger(__name__)

ENV_VARS: tuple[str, ...] = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
#: File name of the systemd credential (`LoadCredential=gemini_api_key:/etc/vlm2vla/gemini_api_key`).
CREDENTIAL_NAME = "gemini_api_key"
REDACTED = "[redacted]"
# Shorter strings are not redacted: replacing every "a" in a message would hide everything and protect nothing.
_MIN_SECRET_LEN = 4


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A secret with a harmless `repr`: printing, logging or formatting it shows only its source."""

    _value: str = field(repr=False)
    source: str  # e.g. "env:GEMINI_API_KEY", "file:/run/credentials/x/gemini_api_key"

    def __post_init__(self) -> None:
        if not self._value or any(c.isspace() for c in self._value):
            raise ConfigError(f"the API key from {self.source} must be one line without spaces")

    def reveal(self) -> str:
        """The key itself: for the HTTP client only."""
        return self._value

    def __str__(self) -> str:
        return f"ApiKey({self.source}, {REDACTED})"

    __repr__ = __str__


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by a marker."""
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_LEN:
            text = text.replace(secret, REDACTED)
    return text


def _read_key_file(path: Path, source: str, *, check_mode: bool) -> ApiKey:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:  # the message names the file, never its content
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the API key file {path} is not UTF-8 text") from None
    value = text.strip()
    if not value:
        raise ConfigError(f"the API key file {path} is empty")
    if check_mode and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("event=credentials_mode path=%s mode=%o hint=chmod_600", path, stat.S_IMODE(mode))
    return ApiKey(value, source)


def load_api_key(key_file: Path | None = None, environ: Mapping[str, str] | None = None) -> ApiKey | None:
    """The first key found in the order above, or None; a configured key file that is unusable is a `ConfigError`."""
    env = os.environ if environ is None else environ
    if key_file is not None:
        return _read_key_file(Path(key_file), f"file:{key_file}", check_mode=True)
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / CREDENTIAL_NAME
        if path.is_file():
            # systemd owns the mode of its credentials directory: no permission warning.
            return _read_key_file(path, f"systemd-credential:{CREDENTIAL_NAME}", check_mode=False)
    for name in ENV_VARS:
        value = env.get(name, "").strip()
        if value:
            return ApiKey(value, f"env:{name}")
    return None
