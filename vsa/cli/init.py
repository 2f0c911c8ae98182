from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, warn


def _relative_to(value: str, folder: Path, must_exist: bool = False) -> str:
    """``value`` (given relative to the current folder) rewritten relative to ``folder``, where vsa.toml lives."""
    import os

    p = Path(os.path.expanduser(value))
    if p.is_absolute() or (must_exist and not p.exists()):
        return value
    if folder.resolve() == Path.cwd().resolve():
        return value
    return os.path.relpath(p.resolve(), folder.resolve())


@app.command("init")
@guarded
def init(
    dataset: str = typer.Option("captions.txt", "--dataset", help="Caption dataset (any supported layout: Karpathy JSON, Flickr8k token file, Kaggle captions.txt, COCO annotations)."),
    images: str = typer.Option("Images", "--images", help="Image root folder."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Detector weights: an ultralytics .pt (path, or a release name such as yolo11n.pt, downloaded when online) or a YOLOv5 state-dict folder (default: the YOLOv5n COCO detector inside vsa)."),
    out: str = typer.Option("work", "--out", help="Folder where stages write their outputs."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing vsa.toml."),
    path: Optional[Path] = typer.Option(None, "--path", help="Where to write (default ./vsa.toml)."),
):
    """Write a vsa.toml workspace config in the current folder."""
    from vsa.cli.config import CONFIG_NAME, write_template
    from vsa.errors import VsaError

    target = path or Path(CONFIG_NAME)
    if target.exists() and not force:
        raise VsaError("already exists (use --force to overwrite)", target)
    # paths on the command line are relative to the current folder; in the file, to the file's folder
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("--dataset", dataset), ("--images", images)):
        if not Path(value).expanduser().exists():
            warn(f"{name} {value} does not exist (yet); edit {target} or pass {name} when it does")
    dataset, images, out = (_relative_to(v, folder) for v in (dataset, images, out))
    detector = _relative_to(detector, folder, must_exist=True) if detector else None
    write_template(target, dataset, images, detector, out)
    info(f"wrote {target}")
