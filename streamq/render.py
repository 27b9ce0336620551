"""Drawing an answer as it streams: ``LiveRenderer`` for a terminal (rich), ``PlainRenderer`` for
pipes and files (the text as it comes, nothing else on stdout).

The live view keeps only the answer's last few rows and a status line (queue position, progress,
reconnects) in rich's Live area; rows the text has moved past are printed above it once, for
good. So a long answer scrolls like ordinary output, and nothing is redrawn but the last rows.
"""

from __future__ import annotations

import re
import sys
from types import TracebackType
from typing import TextIO

from rich.cells import cell_len
from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from streamq.turn import Turn

_TOKENS = re.compile(r"\S+\s*|\s+")
# Control characters could drive the terminal (escape sequences from a model's text): shown as �.
_CONTROLS = {c: "\ufffd" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if c != 0x0A}
_CONTROLS |= {0x09: "    ", 0x0D: ""}


def printable(text: str) -> str:
    return text.translate(_CONTROLS)


def wrap_rows(text: str, width: int) -> list[str]:
    """Greedy word wrap of one paragraph (no newlines) into rows of at most ``width`` cells (not
    counting a row's trailing spaces). The rows joined give back ``text`` exactly, and appending
    text only ever changes the last row, so rows before it can be printed for good."""
    rows: list[str] = []
    row, cells = "", 0
    for token in _TOKENS.findall(text):
        visible = cell_len(token.rstrip())
        if row and cells + visible > width:
            rows.append(row)
            row, cells = "", 0
        if visible <= width:
            row, cells = row + token, cells + cell_len(token)
            continue
        for ch in token:  # a word longer than a row is cut
            size = cell_len(ch)
            if row and cells + size > width and not ch.isspace():
                rows.append(row)
                row, cells = "", 0
            row, cells = row + ch, cells + size
    if row or not rows:
        rows.append(row)
    return rows


class LiveRenderer:
    def __init__(self, console: Console, max_rows: int = 8) -> None:
        self.console = console
        self.max_rows = max_rows
        self._tail = ""  # the answer's text not printed for good yet
        self._live: Live | None = None

    def __enter__(self) -> LiveRenderer:
        self._live = Live(console=self.console, transient=True, refresh_per_second=12, redirect_stdout=False)
        self._live.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    @property
    def _width(self) -> int:
        return max(10, self.console.width - 1)

    def _print_rows(self, rows: list[str]) -> None:
        for row in rows:
            self.console.print(Text(row.rstrip(), no_wrap=True, overflow="crop"), highlight=False)

    def _commit(self) -> None:
        """Print the rows the answer has moved past; keep its last rows in the live area."""
        if "\n" in self._tail:
            finished, self._tail = self._tail.rsplit("\n", 1)
            for paragraph in finished.split("\n"):
                self._print_rows(wrap_rows(paragraph, self._width))
        rows = wrap_rows(self._tail, self._width)
        keep = max(1, min(self.max_rows, self.console.height - 4))
        if len(rows) > keep:
            self._print_rows(rows[:-keep])
            self._tail = "".join(rows[-keep:])

    def update(self, turn: Turn) -> None:
        new = turn.take_chunks()
        if new:
            self._tail += printable(new)
            self._commit()
        if self._live is not None:
            rows = "\n".join(r.rstrip() for r in wrap_rows(self._tail, self._width)) if self._tail else ""
            status = Spinner("dots", Text(turn.status_line(), style="dim"), style="cyan")
            self._live.update(Group(Text(rows, no_wrap=True), status) if rows else status)

    def finish(self, turn: Turn, note: str | None = None) -> None:
        """The answer ended (or was left): print what is left of it, then a line on how it ended."""
        self.update(turn)
        self._stop()
        if self._tail:
            self._print_rows(wrap_rows(self._tail, self._width))
            self._tail = ""
        style = {"done": "dim green", "canceled": "dim yellow"}.get(turn.phase, "red")
        self.console.print(Text(f"[{turn.summary()}]", style=style), highlight=False)
        if note:
            self.console.print(Text(note, style="dim"), highlight=False)

    def problem(self, message: str) -> None:
        self._stop()
        self.console.print(Text(message, style="bold red"), highlight=False)


class PlainRenderer:
    """The answer's text as it comes on ``out``; with ``summary``, a bracketed last line on how it
    ended (the chat); without, nothing else there (``streamq ask`` in a pipe)."""

    def __init__(self, out: TextIO, summary: bool) -> None:
        self.out = out
        self.summary = summary

    def __enter__(self) -> PlainRenderer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.out.flush()

    def update(self, turn: Turn) -> None:
        new = turn.take_chunks()
        if new:
            self.out.write(new)
            self.out.flush()

    def finish(self, turn: Turn, note: str | None = None) -> None:
        self.update(turn)
        if turn.text and not turn.text.endswith("\n"):
            self.out.write("\n")
        if self.summary:
            self.out.write(f"[{turn.summary()}]\n")
            if note:
                self.out.write(note + "\n")
        else:
            if turn.phase != "done":
                print(f"streamq: {turn.summary()}", file=sys.stderr)
            if note:
                print(f"streamq: {note}", file=sys.stderr)
        self.out.flush()

    def problem(self, message: str) -> None:
        print(message, file=sys.stderr if not self.summary else self.out)


Renderer = LiveRenderer | PlainRenderer
