from __future__ import annotations

import typer

from vsa.cli import app
from vsa.errors import NotImplementedStage
from vsa.cli.common import guarded


@app.command("regions", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def regions(ctx: typer.Context):
    """Detect regions: whole image + top-19 detector boxes per image, as JSONL."""
    raise NotImplementedStage("regions")
