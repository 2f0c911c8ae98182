from __future__ import annotations

import typer

from vsa.cli import app
from vsa.errors import NotImplementedStage
from vsa.cli.common import guarded


@app.command("embed", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def embed(ctx: typer.Context):
    """CNN features of regions (or whole images) into one NPZ."""
    raise NotImplementedStage("embed")
