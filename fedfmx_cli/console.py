"""What every command shares: the stderr console and one-line errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from fedfmx.errors import FedFMXError

console = Console(stderr=True, soft_wrap=True)

DEBUG_VARIABLE = "FEDFMX_DEBUG"
"""Set to 1 to see the traceback of an unexpected error instead of its one line."""

P = ParamSpec("P")
R = TypeVar("R")


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the project's exceptions into one line on stderr and exit status 2; anything
    else (a bug, or an input no check foresaw) into one line and status 1, never a traceback
    (`FEDFMX_DEBUG=1` shows it)."""

    @wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except FedFMXError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:
            if os.environ.get(DEBUG_VARIABLE) == "1":
                raise
            first = (str(error).strip().splitlines() or [""])[0][:300]
            console.print(
                f"[bold red]error:[/] unexpected {type(error).__name__}: {first} "
                f"(set {DEBUG_VARIABLE}=1 for the traceback)",
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper
