"""The `localmoe` command line: run, info, convert, models.

Bad input of any kind (missing or corrupt files, unknown flags or values) ends with one line on
stderr and exit code 2; stdout carries only generated text.
"""
from __future__ import annotations

import codecs
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer 0.29 vendors click
from rich.console import Console
from rich.table import Table

from .errors import InputError, LocalMoeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Quantised local inference for Mixture-of-Experts models.")
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF path or models.toml preset (default: $LOCALMOE_MODEL).")


def _model_name(model: Optional[str]) -> str:
    name = model or os.environ.get("LOCALMOE_MODEL")
    if not name:
        raise InputError("no model given: pass -m MODEL (a .gguf file or a preset from `localmoe models`) "
                         "or set LOCALMOE_MODEL")
    return name


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


@app.command()
def run(prompt: Optional[str] = typer.Argument(None, help="Prompt text; stdin, if piped, comes before it."),
        model: Optional[str] = ModelOpt,
        max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1),
        temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0),
        seed: Optional[int] = typer.Option(None, "--seed"),
        ctx: Optional[int] = typer.Option(None, "--ctx", min=16, help="Context length (default 8192)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Speed and expert statistics on stderr.")):
    """Generate a continuation of PROMPT (raw text) and stream it to stdout."""
    from .model import load

    text = _prompt_text(prompt)
    _announce_jit()
    t0 = time.perf_counter()
    m = load(_model_name(model), n_ctx=ctx)
    t_load = time.perf_counter() - t0
    ids = m.tokenizer.encode(text, bos=True)
    out = sys.stdout
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    t1 = time.perf_counter()
    t_first, n = None, 0
    for tok in m.generate(ids, max_tokens=max_tokens, temperature=temperature, seed=seed):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        if tok == m.tokenizer.eos_id:
            break
        out.write(utf8.decode(m.tokenizer.token_bytes(tok)))
        out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")
    out.flush()
    if verbose:
        t_end = time.perf_counter()
        s = m.stats
        t_first = t_first or t_end
        decode_s = t_end - t_first
        per_tok = s.expert_bytes / max(1, s.tokens)
        err.print(f"load {t_load:.2f} s | prompt {len(ids)} tok, {len(ids) / max(t_first - t1, 1e-9):.1f} tok/s | "
                  f"time to first token {t_first - t1:.2f} s | decode {n} tok, "
                  f"{max(0, n - 1) / max(decode_s, 1e-9):.1f} tok/s | peak RSS "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB | experts read "
                  f"{s.expert_reads} ({s.expert_bytes / 2**20:.1f} MiB, {per_tok / 2**20:.2f} MiB/token)")


@app.command()
def info(path: Path = typer.Argument(..., help="A GGUF file."),
         tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="Print the tensor table.")):
    """Architecture, sizes, quant types and tensors of a GGUF file."""
    from collections import Counter

    from .gguf.format import KEY_QUANT_FALLBACK
    from .gguf.reader import GGUFFile
    from .models import module_for

    f = GGUFFile(path)
    arch = f.require("general.architecture")
    cfg = module_for(arch).Config.from_gguf(f)
    out = Console(highlight=False)
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
def convert(src: Path = typer.Argument(..., help="Hugging Face checkpoint directory."),
            out: Path = typer.Argument(..., help="Output .gguf file."),
            quant: str = typer.Option("q8_0", "--quant", "-q", help="f32, f16, bf16, q8_0 or q4_0")):
    """Convert a Hugging Face checkpoint (safetensors) to GGUF, streaming tensor by tensor."""
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


@app.command()
def models():
    """List the model presets of models.toml and whether their files are present."""
    from .registry import home, presets

    table = Table("name", "architecture", "description", "file", box=None, pad_edge=False)
    for name, p in presets().items():
        path = home() / p["file"].format(quant=p["default_quant"])
        table.add_row(name, p["architecture"], p["description"], str(path) if path.is_file() else "not converted")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="localmoe", standalone_mode=False)
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
