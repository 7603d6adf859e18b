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
    """Run the command line; user errors print one sentence and exit 2."""
    setup_logging()
    try:
        # standalone mode lets click print usage errors its own way (no traceback);
        # StreamVG's own errors pass through it and become one sentence here.
        app(args=argv, prog_name="streamvg")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except StreamVGError as exc:
        typer.echo(f"error: {mask_text(str(exc))}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
