from __future__ import annotations

import typer

from vsa.cli import app
from vsa.errors import NotImplementedStage
from vsa.cli.common import guarded


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def evaluate(ctx: typer.Context):
    """Retrieval (aligner) and caption metrics (generator) on a split."""
    raise NotImplementedStage("eval")
