"""fp8mix command line: `fp8mix info | score | schemes | plan | export | check | eval | report | run`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import FP8MixError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sensitivity-guided FP8 mixed precision for vision-language models served by vLLM.")
console = Console()
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local folder; default: the embedded "
                                                                      "tiny Qwen2.5-VL")]


def _version(value: bool) -> None:
    if value:
        console.print(f"fp8mix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


@app.command()
def info(model: ModelOpt = None) -> None:
    """Show the model as fp8mix sees it: LM blocks, fused linear groups, what stays BF16 and why."""
    from .models.info import describe

    describe(model, console)


def main() -> None:
    try:
        app()
    except FP8MixError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
