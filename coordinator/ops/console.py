"""The rich consoles our commands print to."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text

# Through a pipe or into a log, rich assumes 80 columns and truncates endpoints, multiaddrs and
# expert specs; this is wide enough for every table we print, without wrapping.
LOG_WIDTH = 240


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr): the terminal's width on a terminal, LOG_WIDTH elsewhere."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else LOG_WIDTH)


def safe_text(value: object, style: str = "") -> Text:
    """Untrusted text (a DHT record's fields, a peer's words) as rich shows it: never parsed as
    markup ("[/]" stays literal) and with control characters escaped (an ESC sequence shows as
    \\x1b, it never reaches the terminal)."""
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return Text(text, style=style)
