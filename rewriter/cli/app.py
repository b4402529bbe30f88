"""The typer application and what every command shares: the consoles, logging, error handling
(:func:`guarded`), the ``--config`` option and the model-path check.

Exit codes: 0 success; 1 a gate failed (numerics, metric, or slower than the input) and no output model
was written; 2 bad input or usage, reported in one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

from rewriter.errors import InputError, RewriterError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Guarded structural rewrites for ONNX CNNs: every rewrite is validated by onnxruntime before it is kept.",
    pretty_exceptions_enable=False,
)
# Not a terminal (CI logs, pipes): no colours, and tables wide enough not to cut names.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200)
log = logging.getLogger("rewriter")

F = TypeVar("F", bound=Callable[..., Any])

_state = {"debug": False}


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (safe under test runners)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO if verbose else (logging.ERROR if quiet else logging.WARNING)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("onnx-bottleneck: %(message)s"))
    root = logging.getLogger("rewriter")
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("passes").handlers[:] = [handler]
    logging.getLogger("passes").setLevel(level)


def guarded(fn: F) -> F:
    """Turn library errors into one-line messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except RewriterError as exc:
            if _state["debug"]:
                raise
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as exc:  # never a traceback for a user unless asked
            if _state["debug"]:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err.print(f"error: {type(exc).__name__}: {first} (rerun with --debug for details)", markup=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the search does: one plain line per decision (for CI logs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the essential result."),
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet
    _state["verbose"] = verbose
    _setup_logging(verbose, quiet)


# -- --config ----------------------------------------------------------------------------------------
def _config_defaults(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """--config FILE: the file's keys become this command's defaults; flags on the command line still win."""
    if value is None or ctx.resilient_parsing:
        return value
    from rewriter.config import command_defaults, load_config, option_key

    root = ctx.find_root()
    try:
        others = {k for cmd in getattr(root.command, "commands", {}).values() for p in cmd.params if (k := option_key(p))}
        found = command_defaults(load_config(value), ctx.command.params, global_params=root.command.params, other_keys=others)
    except RewriterError as exc:
        if _state["debug"]:
            raise
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from None
    ctx.default_map = {**(ctx.default_map or {}), **found.default_map}
    for name, flag in found.global_options.items():  # --quiet/--verbose/--debug given before the command win
        source = root.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":
            _state[name] = flag
    if found.global_options:
        _setup_logging(bool(_state.get("verbose")), bool(_state.get("quiet")))
    return value


ConfigOpt = typer.Option(
    None, "--config", is_eager=True, callback=_config_defaults,
    help="TOML file of option defaults: keys are option names (max-error = \"cosine>=0.999\"); flags given here win.",
)




def model_path(path: Path) -> Path:
    """``path`` if it is a file; else a usage error saying what it is."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX model file")
    return path


def quiet() -> bool:
    """``--quiet`` was given (on the command line or in a config file)."""
    return bool(_state.get("quiet"))


def pass_options(config_file: Optional[Path]) -> dict[str, dict[str, Any]]:
    """The ``[pass-options.NAME]`` tables of ``--config`` (none without one)."""
    from rewriter.config import load_config

    return load_config(config_file).pass_options if config_file is not None else {}


def model_tables(config_file: Optional[Path]) -> list[Any]:
    """The ``[models."PATTERN"]`` tables of ``--config``, checked (:class:`rewriter.zoo.ModelSettings`)."""
    from rewriter.config import load_config
    from rewriter.zoo import model_settings

    return model_settings(load_config(config_file)) if config_file is not None else []
