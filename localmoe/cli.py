"""The `localmoe` command line: run, info, convert, models.

Bad input of any kind (missing or corrupt files, unknown flags or values) ends with one line on
stderr and exit code 2; stdout carries only generated text.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer 0.29 vendors click
from rich.console import Console
from rich.table import Table

from .chat import DEFAULT_MAX_TOKENS
from .errors import InputError, LocalMoeError
from .sampling import SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Quantised local inference for Mixture-of-Experts models.")
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelOpt = typer.Option(None, "--model", "-m",
                        help="GGUF path or models.toml preset (default: $LOCALMOE_MODEL, else the bundled demo).")


def _prompt_text(prompt: Optional[str]) -> str:
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    text = "\n\n".join(p for p in (stdin.rstrip("\n"), prompt or "") if p)
    if not text.strip():
        raise InputError("no prompt: give PROMPT as an argument or pipe text on stdin")
    return text


def _announce_jit() -> None:
    from .backends.cpu import kernels_cached
    if not kernels_cached():
        err.print("[dim]Compiling kernels for this machine (first run only, about a minute)...[/dim]")


# Options shared by `run` and `chat`.
SystemOpt = typer.Option(None, "--system", "-s", help="System prompt.")
EffortOpt = typer.Option(None, "--effort", "-e", help="Reasoning effort, e.g. none or high (as the model accepts).")
TopPOpt = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep tokens up to this probability mass.")
TopKOpt = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off).")
MinPOpt = typer.Option(0.0, "--min-p", help="Drop tokens below min-p x the top probability.")
SeedOpt = typer.Option(None, "--seed", help="Random seed for sampling.")
MaxTokensOpt = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n", min=1, help="Most tokens per reply.")
StopOpt = typer.Option(None, "--stop", help="Stop at this text (repeatable); it is not printed.")
CtxOpt = typer.Option(None, "--ctx", min=16, help="Context length (default 8192).")
HideThinkingOpt = typer.Option(False, "--hide-thinking", help="On a terminal, do not show the model's thinking.")
ShowThinkingOpt = typer.Option(False, "--show-thinking", help="In a pipe, send the thinking to stderr.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Speed and expert statistics on stderr.")
BackendOpt = typer.Option("cpu", "--backend", help="cpu, cuda, or auto (CUDA when a GPU is usable).")
GpuMemOpt = typer.Option(None, "--gpu-mem", help="With --backend cuda: VRAM for a cache of routed experts "
                         "streamed from the file (e.g. 24G); default: every weight resident when the model fits, "
                         "else the VRAM left.")
ImageOpt = typer.Option(None, "--image", "-i", help="An image for the (first) message (repeatable).")


def parse_size(text: Optional[str]) -> Optional[int]:
    """"24G", "512M", "1.5GiB", "123456" -> bytes (K/M/G/T are powers of 1024)."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1024 ** ("KMGT".index(t[-1]) + 1) if t and t[-1] in "KMGT" else 1
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        value = -1
    if not value > 0:
        raise InputError(f"--gpu-mem {text!r}: expected a size such as 24G or 512M")
    return int(value * scale)


def _load(model: Optional[str], ctx: Optional[int], backend: str = "cpu", gpu_mem: Optional[str] = None):
    from .model import load

    size = parse_size(gpu_mem)
    _announce_jit()
    t0 = time.perf_counter()
    m = load(model or os.environ.get("LOCALMOE_MODEL"), backend=backend, n_ctx=ctx, gpu_mem=size)  # None: the demo
    return m, time.perf_counter() - t0


def _thinking_choice(show: bool, hide: bool) -> Optional[bool]:
    if show and hide:
        raise InputError("--show-thinking and --hide-thinking exclude each other")
    return True if show else False if hide else None


@app.command()
def run(prompt: Optional[str] = typer.Argument(None, help="Prompt text; stdin, if piped, comes before it."),
        model: Optional[str] = ModelOpt,
        system: Optional[str] = SystemOpt,
        effort: Optional[str] = EffortOpt,
        raw: bool = typer.Option(False, "--raw", help="Continue the text as is, without the chat format."),
        temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 (default): greedy."),
        top_p: float = TopPOpt, top_k: int = TopKOpt, min_p: float = MinPOpt, seed: Optional[int] = SeedOpt,
        max_tokens: int = MaxTokensOpt,
        stop: Optional[list[str]] = StopOpt,
        ctx: Optional[int] = CtxOpt,
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object: thinking, answer, stats."),
        hide_thinking: bool = HideThinkingOpt, show_thinking: bool = ShowThinkingOpt,
        image: Optional[list[str]] = ImageOpt,
        backend: str = BackendOpt,
        gpu_mem: Optional[str] = GpuMemOpt,
        verbose: bool = VerboseOpt):
    """Answer PROMPT in the model's chat format (or continue raw text) and stream it to stdout."""
    from .chat import Reply, Session
    from .display import Printer

    thinking = _thinking_choice(show_thinking, hide_thinking)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    if raw and (system or effort or image):
        raise InputError("--system, --effort and --image need the chat format; leave out --raw")
    text = _prompt_text(prompt)
    m, t_load = _load(model, ctx, backend, gpu_mem)
    session = Session(m, system=system, params=params, max_tokens=max_tokens, stops=stop or ())
    reply = Reply()
    if raw:
        parts = session.complete(m.tokenizer.encode(text, bos=True), reply)
    else:
        session.set_effort(effort)
        parts = session.send(text, reply, images=image or ())
    printer = Printer(terminal=False if json_out else None, show_thinking=thinking)
    interrupted = False
    try:
        for kind, part in parts:
            if not json_out:
                printer.write(kind, part)
    except KeyboardInterrupt:
        parts.close()
        interrupted = True
    if json_out:
        print(json.dumps(reply.as_dict(), ensure_ascii=False), flush=True)
    else:
        printer.end()
    if verbose:
        err.print(f"load {t_load:.2f} s | {reply.stats.line()}")
        if m.stats.cache_line():
            err.print(m.stats.cache_line())
    if interrupted:
        raise KeyboardInterrupt


@app.command()
def chat(model: Optional[str] = ModelOpt,
         system: Optional[str] = SystemOpt,
         effort: Optional[str] = EffortOpt,
         temperature: float = typer.Option(0.7, "--temperature", "-t", help="0: greedy."),
         top_p: float = TopPOpt, top_k: int = TopKOpt, min_p: float = MinPOpt, seed: Optional[int] = SeedOpt,
         max_tokens: int = MaxTokensOpt,
         stop: Optional[list[str]] = StopOpt,
         ctx: Optional[int] = CtxOpt,
         image: Optional[list[str]] = ImageOpt,
         backend: str = BackendOpt,
         gpu_mem: Optional[str] = GpuMemOpt,
         hide_thinking: bool = HideThinkingOpt):
    """Chat in the terminal: streamed replies, /help for commands, Ctrl-C stops a reply, Ctrl-D leaves."""
    from .chat import Session
    from .registry import home
    from .repl import Chat, setup_history

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    m, _ = _load(model, ctx, backend, gpu_mem)
    session = Session(m, system=system, params=params, max_tokens=max_tokens, stops=stop or ())
    session.set_effort(effort)
    save_history = setup_history(home() / "chat_history")
    try:
        Chat(session, Console(highlight=False), show_thinking=not hide_thinking, images=image or ()).run(input)
    finally:
        save_history()


@app.command()
def info(path: Path = typer.Argument(..., help="A GGUF file."),
         tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="Print the tensor table.")):
    """Architecture, sizes, quant types and tensors of a GGUF file."""
    from collections import Counter

    from .gguf.format import KEY_QUANT_FALLBACK
    from .gguf.reader import GGUFFile
    from .models import module_for

    from .vision import companion_path, describe

    f = GGUFFile(path)
    arch = f.require("general.architecture")
    out = Console(highlight=False)
    vision = [f] if arch == "clip" else [GGUFFile(p) for p in [companion_path(path)] if p.is_file()]
    if arch != "clip":          # a vision companion (mmproj) given on its own has only the vision lines
        cfg = module_for(arch).Config.from_gguf(f)
        n_params = sum(_count(t.shape) for t in f.tensors.values())
        out.print(f"[bold]{path}[/bold]  {f.size / 2**30:.2f} GiB, {len(f.tensors)} tensors, {n_params / 1e6:.1f} M parameters")
        out.print(f"architecture: {arch}  ({f.get('localmoe.source_architecture', 'converted elsewhere')})")
        fields = ", ".join(f"{k}={v}" for k, v in vars(cfg).items() if not k.startswith("rope"))
        out.print(f"config: {fields}")
        out.print(f"rope: {cfg.rope}")
        types = Counter(t.type.name for t in f.tensors.values())
        out.print("types: " + ", ".join(f"{k} x{v}" for k, v in sorted(types.items())))
        fallback = list(f.get(KEY_QUANT_FALLBACK, []))
        out.print(f"kept in F16 (rows not a multiple of 32): {', '.join(fallback) if fallback else 'none'}")
        out.print(f"tokenizer: {f.get('tokenizer.ggml.model', '?')} ({f.get('tokenizer.ggml.pre', '')}), "
                  f"{len(f.get('tokenizer.ggml.tokens', []))} tokens")
    for line in (line for v in vision for line in describe(v)):
        out.print(line)
    if tensors:
        table = Table("tensor", "shape", "type", "MiB", box=None, pad_edge=False)
        for t in f.tensors.values():
            table.add_row(t.name, "x".join(map(str, t.shape)), t.type.name, f"{t.nbytes / 2**20:.2f}")
        out.print(table)


def _count(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@app.command()
def convert(src: Path = typer.Argument(..., help="Hugging Face checkpoint directory, or a GGUF file to requantize."),
            out: Path = typer.Argument(..., help="Output .gguf file."),
            quant: str = typer.Option("q8_0", "--quant", "-q", help="f32, f16, bf16, q8_0 or q4_0")):
    """Convert a Hugging Face checkpoint (safetensors) to GGUF, or requantize a GGUF, streaming tensor by tensor."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from convert import convert as run_convert

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"converting to {quant}", total=None)
        report = run_convert(src, out, quant, progress=lambda n: bar.advance(task, n),
                             on_plan=lambda total: bar.update(task, total=None))
    fallback = [p.name for p in report.tensors if p.type.name == "F16" and quant not in ("f16", "f32")]
    err.print(f"wrote {report.out} ({report.nbytes / 2**20:.1f} MiB, arch {report.arch}, tokenizer {report.tokenizer})")
    if fallback:
        err.print(f"kept in F16 (rows not a multiple of 32): {', '.join(fallback)}")
    if report.requantized_from:
        err.print(f"requantized from {report.requantized_from}, not from the original weights: quality can differ "
                  f"slightly from a direct conversion")


@app.command()
def models():
    """List the model presets of models.toml: size, accepted efforts, and whether the file is present."""
    from .registry import DEFAULT, home, preset_file, presets

    out = Console(highlight=False)
    for name, p in presets().items():
        quant = p.get("default_quant")
        facts = [f"{p['sizes_gb'][quant]} GB as {quant}" if quant in p.get("sizes_gb", {}) else "",
                 f"efforts: {', '.join(p['efforts'])}" if p.get("efforts") else "", f"needs {p['hardware_minimum']}" if p.get("hardware_minimum") else ""]
        path = preset_file(p)
        if p.get("bundled"):
            state = "bundled, present" if path.is_file() else "bundled, but missing: reinstall localmoe"
        else:
            state = "present" if path.is_file() else "not converted"
        out.print(f"[bold]{name}[/bold]{' (default)' if name == DEFAULT else ''}  {p['description']}")
        if any(facts):
            out.print("  " + " | ".join(f for f in facts if f))
        out.print(f"  file: {path} ({state})")
    err.print(f"files under {home()} (set LOCALMOE_HOME to change); `localmoe run -m NAME` uses one, "
              f"`localmoe run` alone uses {DEFAULT}")


def main(argv: list[str] | None = None) -> None:
    try:
        if app(args=argv, prog_name="localmoe", standalone_mode=False) == 130:
            raise KeyboardInterrupt      # typer returns Ctrl-C as exit code 130 in this mode
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except NoArgsIsHelpError as e:
        print(e.format_message() if hasattr(e, "format_message") else e, file=sys.stderr)
        sys.exit(2)
    except ClickException as e:
        _fail(e.format_message(), 2)
    except LocalMoeError as e:
        _fail(str(e), 2)
    except BrokenPipeError:
        sys.exit(0)
    except (OSError, MemoryError) as e:
        _fail(str(e), 1)


def _fail(message: str, code: int) -> None:
    """One line on stderr, then exit: bad input never shows a traceback."""
    print(f"localmoe: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(code)
