"""Entry point of the ``p2pmsg`` console script."""

from __future__ import annotations

import click

from p2pmsg import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2pmsg")
def cli() -> None:
    """p2pmsg: a serverless, end-to-end encrypted messenger."""


def main() -> None:
    """Run the command line."""
    cli()
