from __future__ import annotations

import typer

from vsa.cli import app
from vsa.errors import NotImplementedStage
from vsa.cli.common import guarded


@app.command("train-align", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def train_align(ctx: typer.Context):
    """Train the region-word alignment model (BRNN, max-margin ranking)."""
    raise NotImplementedStage("train-align")


@app.command("score", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def score(ctx: typer.Context):
    """Image-sentence score and, per word, its best region."""
    raise NotImplementedStage("score")


@app.command("search", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def search(ctx: typer.Context):
    """Index a folder of photos; rank images for a text query."""
    raise NotImplementedStage("search")
