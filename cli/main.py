"""Entry point of the `thinpool` command line."""

from __future__ import annotations

import click

from thinpool import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="thinpool")
def cli() -> None:
    """thinpool: thin-provisioned block devices with dm-thin metadata."""


def main() -> None:
    cli()
