"""The software versions a result records (evaluation reports, training cards), gathered in one place.

A figure is only comparable with another taken under the same software; every artefact that carries
figures records the same facts, under the same keys.
"""

from __future__ import annotations

import platform
from importlib import metadata

from vlm2vla_edge.runtime import __version__


def versions(*distributions: str) -> dict[str, str]:
    """This package, Python and the platform, then the installed version of each named distribution
    ("absent" when it is not installed: a report must still be written without the optional extras)."""
    found = {"vlm2vla-edge": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for dist in distributions:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "absent"
    return found
