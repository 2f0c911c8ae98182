from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info


@app.command("init")
@guarded
def init(
    dataset: str = typer.Option("../shared/data/flickr8k/dataset_flickr8k.json", "--dataset", help="Caption dataset (any supported layout)."),
    images: str = typer.Option("../shared/data/flickr8k/images", "--images", help="Image root folder."),
    detector: str = typer.Option("yolo11n.pt", "--detector", help="Detector weights (ultralytics path/name or YOLOv5 state-dict folder)."),
    out: str = typer.Option("work", "--out", help="Folder where stages write their outputs."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing vsa.toml."),
    path: Optional[Path] = typer.Option(None, "--path", help="Where to write (default ./vsa.toml)."),
):
    """Write a vsa.toml workspace config in the current folder."""
    from vsa.config import CONFIG_NAME, write_template
    from vsa.errors import VsaError

    target = path or Path(CONFIG_NAME)
    if target.exists() and not force:
        raise VsaError("already exists (use --force to overwrite)", target)
    write_template(target, dataset, images, detector, out)
    info(f"wrote {target}")
