"""`kbit`: the app, and the one place where errors become messages and exit codes."""
from __future__ import annotations

import os
import sys

import typer

from .. import __version__
from ..errors import EXIT_INTERRUPTED, CliError, exit_code_for

app = typer.Typer(
    name="kbit",
    help="Turn LLM checkpoints into k-bit models (k = 2..8) and prove they still work.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from kbitformat import FORMAT_VERSION_STR
        typer.echo(f"kbit {__version__} (kbit format {FORMAT_VERSION_STR})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """kbit: k-bit quantization of LLM checkpoints, with checks that they still work."""


def _register() -> None:
    from . import convert_cmds  # noqa: F401  (commands register themselves on `app`)
    from . import hub_cmds  # noqa: F401  (kbit pull / kbit push)
    from . import generate_cmd  # noqa: F401  (kbit generate)
    from . import eval_cmds  # noqa: F401  (kbit perplexity / compare / eval)
    from . import sweep_cmd  # noqa: F401  (kbit sweep)


_register()


#: commands that run models with the torch runner (see main() on OMP_WAIT_POLICY)
RUNNER_COMMANDS = frozenset({"generate", "perplexity", "compare", "eval"})


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; known errors print one line (no traceback unless KBIT_DEBUG is set)."""
    debug = bool(os.environ.get("KBIT_DEBUG"))
    # Numba's OpenMP workers otherwise spin after each kernel and starve numpy's BLAS threads
    # (measured: SmolLM2 converts 2.6x faster). The runner's commands are the other way round:
    # one decode step alternates many short Numba and torch parallel regions, and sleeping
    # workers wake too slowly (measured on SmolLM2 4-bit: generate decodes 17.5 tokens/s with
    # spinning workers, 12.5 with passive ones; perplexity 6% faster). Set before Numba loads
    # its OpenMP pool; a user's setting wins.
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in RUNNER_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        # Without standalone mode Typer returns the code of a typer.Exit (130 for Ctrl-C).
        rv = app(args=argv, prog_name="kbit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except SystemExit as e:  # typer.Exit / click exits
        return int(e.code or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("kbit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (typer.Exit, typer.Abort) as e:
        if isinstance(e, typer.Abort):
            print("kbit: aborted", file=sys.stderr)
            return EXIT_INTERRUPTED
        return int(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the one place that reports errors
        # Typer's own usage errors (bad option, missing argument): they know how to show themselves.
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int) and not isinstance(e, CliError):
            e.show()
            return e.exit_code
        if debug:
            raise
        from kbitformat import KbitError
        if isinstance(e, (CliError, KbitError, OSError)):
            msg = str(e) if not isinstance(e, OSError) or not e.strerror else f"{e.filename or ''}: {e.strerror}".lstrip(": ")
            print(f"kbit: error: {msg}", file=sys.stderr)
            return exit_code_for(e)
        print(f"kbit: internal error: {type(e).__name__}: {e}\n(set KBIT_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return 1


def entry() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
