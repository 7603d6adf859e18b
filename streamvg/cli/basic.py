"""`streamvg version` and `streamvg config check`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from streamvg import __version__
from streamvg.config import load_pipeline

config_app = typer.Typer(help="Check pipeline files.", no_args_is_help=True)


def version(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print StreamVG's version and the versions of the libraries it runs on."""
    import importlib.metadata as md

    info: dict[str, str | None] = {"streamvg": __version__}
    for dist in ("torch", "transformers", "av", "decord", "opencv-python-headless", "redis", "pydantic", "numpy"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    if json_out:
        typer.echo(json.dumps(info))
        return
    typer.echo(f"streamvg {__version__}")
    for k, v in info.items():
        if k != "streamvg":
            typer.echo(f"  {k:<24} {v or 'not installed'}")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="Pipeline YAML file to validate.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the resolved config as JSON.")] = False,
) -> None:
    """Validate a pipeline file and print the resolved config, passwords masked.

    Environment overrides (`STREAMVG_ENGINE__MODEL=…`, `STREAMVG_SINKS__REDIS__URL=…`) and
    `${VAR}` references are applied, so what is printed is what `streamvg monitor` would run.
    """
    cfg = load_pipeline(file)
    data = cfg.masked()
    if json_out:
        typer.echo(json.dumps(data, indent=2))
    else:
        typer.echo(f"# {file}: valid")
        typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


def register(app: typer.Typer) -> None:
    app.command("version")(version)
    app.add_typer(config_app, name="config")
