"""Showing a streamed reply: the answer on stdout, the model's thinking apart from it.

On a terminal the thinking streams dimmed before the answer (or is hidden); in a pipe stdout carries
only the answer, and the thinking goes to stderr when asked for. The chat re-renders a finished answer
as Markdown in place when it is still on the screen.
"""
from __future__ import annotations

import sys

from rich.cells import cell_len
from rich.console import Console
from rich.markdown import Markdown

DIM, RESET, CLEAR_LINE = "\x1b[2m", "\x1b[0m", "\r\x1b[K"


class Printer:
    """Writes ("notice"|"thinking"|"answer", text) parts as they stream."""

    def __init__(self, out=None, err=None, terminal: bool | None = None, show_thinking: bool | None = None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.terminal = self.out.isatty() if terminal is None else terminal
        # on a terminal thinking is shown unless hidden; in a pipe only when asked for
        self.show_thinking = self.terminal if show_thinking is None else show_thinking
        self.kind = None           # kind of the last part written
        self.answer = ""           # the answer as shown (leading whitespace dropped)
        self.hint_shown = False

    def write(self, kind: str, text: str) -> None:
        if kind == "notice":
            self._line(self.err, f"{DIM}[{text}]{RESET}" if self.terminal else f"localmoe: {text}")
        elif kind == "thinking":
            self._thinking(text)
        else:
            self._answer(text)

    def _line(self, stream, text: str) -> None:
        self._close_thinking()
        stream.write(text + "\n")
        stream.flush()

    def _thinking(self, text: str) -> None:
        if not self.show_thinking:
            if self.terminal and not self.hint_shown:
                self.out.write(f"{DIM}thinking…{RESET}")
                self.out.flush()
                self.hint_shown = True
            return
        stream = self.out if self.terminal else self.err
        if self.kind != "thinking" and self.terminal:
            stream.write(DIM)
        stream.write(text)
        stream.flush()
        self.kind = "thinking"

    def _close_thinking(self) -> None:
        """End the thinking block: reset the colour and start the answer on a fresh line."""
        if self.hint_shown and not self.show_thinking:
            self.out.write(CLEAR_LINE)
            self.hint_shown = False
        if self.kind == "thinking":
            stream = self.out if self.terminal else self.err
            stream.write(RESET + "\n\n" if self.terminal else "\n")
            stream.flush()
            self.kind = None

    def _answer(self, text: str) -> None:
        if not self.answer:
            text = text.lstrip()
            if not text:
                return
            self._close_thinking()
        self.answer += text
        self.out.write(text)
        self.out.flush()
        self.kind = "answer"

    def end(self) -> None:
        """Finish the reply: close an unterminated thinking block, end the answer's line."""
        self._close_thinking()
        if self.answer and not self.answer.endswith("\n"):
            self.out.write("\n")
        self.out.flush()

    def rerender_markdown(self, console: Console) -> None:
        """Replace the streamed answer by its Markdown rendering if all of it is still on screen."""
        if not self.terminal or not self.answer.strip():
            return
        width, height = console.size
        lines = self.answer.rstrip("\n").split("\n")
        rows = sum(max(1, -(-cell_len(line) // width)) for line in lines)
        if rows >= height:
            return
        self.out.write(f"\x1b[{rows}A\r\x1b[J")
        self.out.flush()
        console.print(Markdown(self.answer))
