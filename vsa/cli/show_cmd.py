from __future__ import annotations

import typer

from vsa.cli import app
from vsa.errors import NotImplementedStage
from vsa.cli.common import guarded


@app.command("align", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def align(ctx: typer.Context):
    """Snippet alignment (chain MRF) of sentences to regions, as JSONL."""
    raise NotImplementedStage("align")


@app.command("show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def show(ctx: typer.Context):
    """Render alignments, captions or retrieval results as HTML pages and PNGs."""
    raise NotImplementedStage("show")
