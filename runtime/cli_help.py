"""`--help` that reads well: prose unwrapped, and option values named the way a user types them.

Two things typer (0.29, rich help) does that read badly: it keeps the line breaks of a docstring's
later paragraphs, so a paragraph wrapped at 100 columns in the source comes out broken mid-sentence at
whatever width the terminal has; and it names every value by its Python type (`<str>`, `<bool>` beside
a flag that takes no value, `<int range>`). `readable_help` walks the command tree typer builds and
fixes both in place: each docstring paragraph becomes one line that rich wraps to the terminal (lists,
indented blocks and click's `\\b` no-rewrap paragraphs stay as written), a flag shows no value, and any
other parameter a conventional name (TEXT, INTEGER, FLOAT, PATH, or its choices a|b|c). Square
brackets in help text are escaped: rich would take "[viewer]" (an extra's name) for markup and drop it.

typer 0.29 builds its commands on a vendored copy of click, so the tree is walked by attribute
(`params`, `commands`, `help`), not by click's classes. An argument's value name is not read from its
metavar (its metavar is its name in the usage line), so its `display_type_rich` is replaced on the
instance; the help option is created on first use, so `get_help_option` is wrapped likewise.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from rich.markup import escape

_KEEP_LINES = re.compile(r"^\s*(?:[-*•]\s|\d+[.)]\s|\x08)|^\s{2,}\S")  # a list item, a `\b` block, an indented line
_TYPE_LABEL = re.compile(r"^<(?P<inner>.*)>$")
_NAMES = {
    "str": "TEXT", "int": "INTEGER", "int range": "INTEGER", "float": "FLOAT", "float range": "FLOAT",
    "path": "PATH", "file": "FILE", "directory": "FOLDER", "bool": "BOOLEAN", "datetime": "DATETIME",
}


def unwrap_paragraphs(text: str) -> str:
    """Join the lines of each paragraph (blank-line separated) with spaces; paragraphs with a list, an
    indented block or click's `\\b` marker keep their lines."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = paragraph.splitlines()
        if any(_KEEP_LINES.match(line) for line in lines[1:]) or paragraph.startswith("\x08"):
            paragraphs.append(paragraph)
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def value_name(type_label: str | None) -> str:
    """typer's type label as a user reads it: '<str>' -> 'TEXT', '<int range>' -> 'INTEGER',
    '<list[str]>' -> 'TEXT' (repeatable options say so in their help), '<a|b>' -> 'a|b'."""
    match = _TYPE_LABEL.match(type_label or "")
    if match is None:
        return type_label or ""
    inner = match["inner"]
    listed = re.fullmatch(r"list\[(.*)\]", inner)
    if listed:
        inner = listed.group(1)
    return _NAMES.get(inner, inner)


def _flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False) or getattr(param, "count", False))


def _readable_param(param: Any) -> None:
    if not hasattr(param, "display_type_rich"):  # older typer on click itself: click names values well
        return
    if getattr(param, "param_type_name", "") == "argument":
        shown: Callable[[Any], str | None] = param.display_type_rich
        param.display_type_rich = lambda ctx: value_name(shown(ctx))
    elif getattr(param, "metavar", None) is None:
        if _flag(param):
            param.metavar = ""
        else:
            shown_option: Callable[[Any], str | None] = param.display_type_rich
            param.display_type_rich = lambda ctx: value_name(shown_option(ctx))


def readable_help(command: Any) -> Any:
    """Unwrap `command`'s help and its sub-commands', and name their values (module docstring)."""
    if getattr(command, "help", None):
        command.help = escape(unwrap_paragraphs(command.help))
    for param in getattr(command, "params", ()):
        if getattr(param, "help", None):
            param.help = escape(param.help)
        _readable_param(param)
    if hasattr(command, "get_help_option"):
        make_help_option = command.get_help_option

        def get_help_option(ctx: Any) -> Any:
            option = make_help_option(ctx)
            if option is not None:
                option.metavar = ""
            return option

        command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        readable_help(sub)
    return command
