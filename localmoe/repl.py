"""`localmoe chat`: the interactive loop around a `chat.Session`.

Input comes through readline (line editing, history kept across sessions in $LOCALMOE_HOME/chat_history,
bracketed paste keeps pasted newlines); a message may also span lines between triple quotes.
Ctrl-C stops a reply (the conversation keeps what was answered) or clears the input line; Ctrl-D exits.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console

from .chat import Reply, Session
from .display import Printer
from .errors import InputError, LocalMoeError

PROMPT = ">>> "
MORE = "... "
QUOTES = '"""'
HISTORY_LINES = 1000


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, or the lines between triple quotes (\"\"\"). EOFError at the end of input."""
    line = read(PROMPT)
    if not line.lstrip().startswith(QUOTES):
        return line
    text = line.lstrip()[len(QUOTES):]
    lines = []
    while not text.rstrip().endswith(QUOTES):
        lines.append(text)
        text = read(MORE)
    lines.append(text.rstrip()[:-len(QUOTES)])
    return "\n".join(lines).strip("\n")


def setup_history(path: Path) -> Callable[[], None]:
    """Load the readline history; returns the function that saves it."""
    try:
        import readline
    except ImportError:            # no line editing on this platform: plain input()
        return lambda: None
    readline.set_history_length(HISTORY_LINES)
    try:
        readline.read_history_file(path)
    except OSError:
        pass

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass
    return save


class Chat:
    """Commands and turns; every error in them is one line, and the session goes on."""

    def __init__(self, session: Session, console: Console, show_thinking: bool = True, images=()):
        self.session = session
        self.console = console
        self.show_thinking = show_thinking
        self.images = list(images)          # attached to the next message
        self.commands = {
            "/help": (self.help, "this list"),
            "/effort": (self.effort, "[VALUE]  show or set the reasoning effort"),
            "/system": (self.system, "[TEXT | -]  show, set or clear (-) the system prompt"),
            "/image": (self.image, "PATH  attach an image to the next message"),
            "/set": (self.set, "[PARAM VALUE]  show or set temperature, top_p, top_k, min_p, seed, max_tokens"),
            "/reset": (self.reset, "start a new conversation (keeps system prompt and settings)"),
            "/save": (self.save, "FILE  save the conversation as JSON"),
            "/load": (self.load, "FILE  load a saved conversation"),
            "/stats": (self.stats, "speed and expert reads of the last reply, context used"),
            "/exit": (None, "leave (or Ctrl-D)"),
        }

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def run(self, read: Callable[[str], str]) -> None:
        m = self.session.model
        fmt = m.chat_format
        efforts = f", effort {self.session.effort or fmt.default_effort} of {'/'.join(fmt.efforts)}" if fmt.efforts else ""
        self.say(f"localmoe chat: {m.path.name} ({fmt.name}{efforts}, context {self.session.cache.n_ctx}). "
                 f"/help for commands, Ctrl-D to leave.")
        while True:
            try:
                text = read_message(read)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.turn(text)

    def command(self, text: str) -> bool:
        """Run one command; False means leave."""
        name, _, arg = text.strip().partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name not in self.commands:
            self.say(f"unknown command {name}; /help lists them", "red")
            return True
        try:
            self.commands[name][0](arg.strip())
        except (LocalMoeError, OSError) as e:
            self.say(f"error: {e}", "red")
        return True

    def turn(self, text: str) -> None:
        printer = Printer(terminal=sys.stdout.isatty(), show_thinking=self.show_thinking)
        reply = Reply()
        images, self.images = self.images, []
        parts = self.session.send(text, reply, images=images)
        try:
            for kind, part in parts:
                printer.write(kind, part)
        except KeyboardInterrupt:
            parts.close()
            printer.end()
            self.say("[stopped]" + ("" if reply.answer.strip() else ": nothing answered, message withdrawn"))
            return
        except LocalMoeError as e:
            printer.end()
            self.say(f"error: {e}", "red")
            return
        printer.end()
        printer.rerender_markdown(self.console)
        if reply.stats.stop_reason == "context":
            self.say("[the context is full: reply cut; older turns will be dropped next]")
        elif reply.stats.stop_reason == "max_tokens":
            self.say(f"[reply cut at {self.session.max_tokens} tokens: /set max_tokens N for longer ones]")

    # -- commands ----------------------------------------------------------------------------------
    def help(self, _arg: str) -> None:
        for name, (_, text) in self.commands.items():
            self.say(f"{name:8} {text}", "")
        self.say(f'{QUOTES} starts and ends a message of several lines; Ctrl-C stops a reply.', "")

    def effort(self, arg: str) -> None:
        if arg:
            self.session.set_effort(arg)
        fmt = self.session.model.chat_format
        current = self.session.effort or fmt.default_effort
        self.say(f"effort: {current} (accepted: {', '.join(fmt.efforts)})" if fmt.efforts
                 else "this model has no reasoning effort setting")

    def system(self, arg: str) -> None:
        if arg:
            self.session.system = None if arg == "-" else arg
        self.say(f"system prompt: {self.session.system!r}" if self.session.system else "no system prompt")

    def image(self, arg: str) -> None:
        """Check the image now (a bad file is one line here, not a failed turn later), then queue it."""
        if not arg:
            self.say(f"images for the next message: {', '.join(self.images) or 'none'}")
            return
        self.session.model.image_tokens(arg)
        self.images.append(arg)
        self.say(f"image {arg} attached to the next message")

    def set(self, arg: str) -> None:
        words = arg.split(None, 1)
        s = self.session
        if len(words) == 2 and words[0].replace("-", "_") == "max_tokens":
            s.max_tokens = positive_int(words[1], "max_tokens")
        elif len(words) == 2:
            s.params = s.params.replace(*words)
        elif words:
            raise InputError("usage: /set PARAM VALUE")
        self.say(", ".join(f"{k}={v}" for k, v in {**vars(s.params), "max_tokens": s.max_tokens}.items()))

    def reset(self, _arg: str) -> None:
        self.session.reset()
        self.say("new conversation")

    def save(self, arg: str) -> None:
        path = Path(file_argument(arg)).expanduser()
        path.write_text(json.dumps(self.session.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        self.say(f"saved {len(self.session.messages) // 2} turns to {path}")

    def load(self, arg: str) -> None:
        path = Path(file_argument(arg)).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a saved conversation ({e})") from None
        try:
            self.session.load_json(data)
        except LocalMoeError as e:
            raise InputError(f"{path}: {e}") from None
        self.say(f"loaded {len(self.session.messages) // 2} turns from {path}")

    def stats(self, _arg: str) -> None:
        s = self.session
        used = f"context: {len(s.cached)} of {s.cache.n_ctx} tokens cached"
        self.say(f"{s.last.stats.line()}\n{used}" if s.last else f"no reply yet; {used}", "")


def file_argument(arg: str) -> str:
    """The one file name of /save and /load (quotes allowed for names with spaces)."""
    try:
        words = shlex.split(arg)
    except ValueError as e:
        raise InputError(f"bad file name: {e}") from None
    if len(words) != 1:
        raise InputError("give one file name")
    return words[0]


def positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"invalid value {text!r} for {name}: must be an integer >= 1")
    return value
