from __future__ import annotations

import typer

from vsa.cli import app
from vsa.errors import NotImplementedStage
from vsa.cli.common import guarded


@app.command("train-mrnn", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def train_mrnn(ctx: typer.Context):
    """Train the multimodal RNN caption generator."""
    raise NotImplementedStage("train-mrnn")


@app.command("caption", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def caption(ctx: typer.Context):
    """Describe images (or their regions) with the generator."""
    raise NotImplementedStage("caption")
