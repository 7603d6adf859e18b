"""The `streamvg` command.

Each command group lives in its own module here and registers itself on `app` through a
`register(app)` function listed in `_COMMAND_MODULES`; this module owns only the root,
the error seam (user errors become one sentence, never a traceback) and `main()`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time

import typer

from streamvg.errors import StreamVGError
from streamvg.redaction import mask_text

__all__ = ["app", "main"]

app = typer.Typer(
    name="streamvg",
    help=(
        "Ask natural-language questions of video files and live cameras; get tracked boxes "
        "on Redis.\n\n"
        "Start with `streamvg demo` (a whole run on generated video, no model needed), then "
        "`streamvg search VIDEO --query TEXT` for offline search or "
        "`streamvg monitor PIPELINE.yaml` for live cameras."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Modules under streamvg.cli that add commands; each defines register(app: typer.Typer).
_COMMAND_MODULES: list[str] = [
    "basic",
    "tail",
    "engine",
    "probe",
    "ground",
    "run",
    "annotate",
    "eval",
]

for _name in _COMMAND_MODULES:
    importlib.import_module(f"streamvg.cli.{_name}").register(app)


class _MaskingFormatter(logging.Formatter):
    """Masks URL credentials in every log line, whatever the caller passed in."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_text(super().format(record))


def setup_logging(verbose: int = 0) -> None:
    """Log to stderr at WARNING (INFO with -v, DEBUG with -vv), passwords masked."""
    level = logging.WARNING - 10 * min(verbose, 2)
    env_level = os.environ.get("STREAMVG_LOG_LEVEL")
    if env_level:
        level = logging.getLevelName(env_level.upper()) if not env_level.isdigit() else int(env_level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (`streamvg.cli.outcome`: 0 done, 1
    finished with failures, 2 bad usage or input, 130 Ctrl-C), never a traceback for a
    StreamVG error.

    Called with no `argv` (the `streamvg` program, `python -m streamvg`), a process that
    loaded torch ends here, right after its outputs are flushed (`_exit_now`); with `argv`
    (tests, scripts) it returns.
    """
    from streamvg.cli.outcome import EXIT_INTERRUPTED, exit_code_for_error

    setup_logging()
    code = 0
    try:
        # standalone mode lets click print usage errors its own way (no traceback);
        # StreamVG's own errors pass through it and become one sentence here.
        app(args=argv, prog_name="streamvg")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except StreamVGError as exc:
        typer.echo(f"error: {mask_text(str(exc))}", err=True)
        code = exit_code_for_error(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    if argv is None and "torch" in sys.modules:
        _exit_now(code)
    return code


def _exit_now(code: int, grace_s: float = 0.5) -> None:
    """End the process with `code` without the interpreter's teardown of torch.

    Everything the command produced is flushed and closed by now. Tearing torch and
    transformers down takes seconds (3-7 s on a busy 2-core machine, longer than a user
    waits after Ctrl-C), and aborts the process ("terminate called without an active
    exception") when an engine thread is still inside a model step that a stop could not
    cut short (a long prefill); such a thread stops at its next token, but is not waited
    for beyond `grace_s`. Exit handlers still run (logging, temporary files), except the
    one that would wait for that thread.
    """
    import atexit

    from streamvg.cli.outcome import flush_std_streams
    from streamvg.pipeline import runtime

    running = runtime.unfinished_engine_threads()
    deadline = time.monotonic() + grace_s
    for t in running:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in running):
        logging.getLogger("streamvg").info("leaving while the model finishes its step; its batch is discarded")
    atexit.unregister(runtime._join_unfinished_at_exit)
    try:
        atexit._run_exitfuncs()
    finally:
        logging.shutdown()
        flush_std_streams()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
