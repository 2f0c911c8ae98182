"""``vsa show``: pictures and HTML pages (the library: vsa.pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, progress, warn


def _kind(path: Path) -> str:
    """alignments | captions | retrieval, from the file's content."""
    from vsa.errors import VsaError
    from vsa.io import iter_jsonl, read_json

    if str(path).endswith(".json") and not str(path).endswith(".jsonl"):
        obj = read_json(path)
        if isinstance(obj, dict):
            return "retrieval"
        raise VsaError("expected retrieval ranks (a JSON object from `vsa eval --ranks-out`)", path)
    for lineno, rec in iter_jsonl(path, with_lineno=True):
        if "caption" in rec:  # a caption record, grounded (`vsa caption --ground`: 'snippets') or not
            return "captions"
        if "snippets" in rec:
            return "alignments"
        raise VsaError("neither an alignment (no 'snippets') nor a caption record (no 'caption')", path, lineno)
    raise VsaError("empty file", path)


@app.command("show")
@guarded
def show(
    inputs: List[Path] = typer.Argument(..., help="Alignments JSONL (`vsa align`), captions JSONL (`vsa caption --json`) or retrieval ranks JSON (`vsa eval --ranks-out`)."),
    out: Path = typer.Option(Path("vsa-show"), "--out", "-o", help="Output folder: index.html / retrieval.html and the PNGs."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root for keys (default: [dataset] images in vsa.toml)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset, for retrieval pages (default: [dataset] path)."),
    keys: Optional[List[str]] = typer.Option(None, "--key", "-k", help="Only these image keys (repeatable)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only alignments of this split."),
    limit: int = typer.Option(50, "--limit", help="At most this many images (0 = all)."),
    sentences: int = typer.Option(5, "--sentences", help="At most this many sentences per image."),
    side: int = typer.Option(512, "--side", help="Draw the image this many pixels on its long side (small images are upscaled)."),
    top: int = typer.Option(5, "--top", help="Retrieval pages: top-ranked sentences/images shown per query."),
    no_png: bool = typer.Option(False, "--no-png", help="Write the HTML page only (retrieval pages have no PNGs)."),
):
    """Pictures of grounded snippets and captions (PNG + a static HTML page), or a retrieval browser page.

    Every page opens from disk (no server, no network): images are files in the output folder.
    """
    from vsa.config import resolve
    from vsa.errors import VsaError
    from vsa.io import iter_jsonl
    from vsa import pictures as P

    out.mkdir(parents=True, exist_ok=True)
    root = resolve(images, "dataset.images", "--images", required=False)
    for inp in inputs:
        kind = _kind(inp)
        if kind == "retrieval":
            from vsa.cli.workspace import open_dataset
            from vsa.pictures import retrieval_data
            from vsa.io import read_json

            ds = open_dataset(dataset, images)
            data = retrieval_data(read_json(inp), ds, out, top=top, source=inp, progress_factory=progress)
            page = P.write_retrieval_page(data, out, title=f"vsa retrieval: {ds.name} {data.get('split', '')}")
            info(f"show: {len(data['i2t'])} images, {len(data['t2i'])} sentences -> {page}")
            continue
        per_image: dict[str, int] = {}
        chosen = []
        for lineno, rec in iter_jsonl(inp, with_lineno=True):
            key = str(rec.get("key") or rec.get("path") or "")
            if keys and key not in keys and Path(key).name not in keys:
                continue
            if split and rec.get("split") not in (None, split):
                continue
            if key not in per_image:
                if limit and len(per_image) >= limit:
                    continue
                per_image[key] = 0
            if per_image[key] >= sentences:
                continue
            per_image[key] += 1
            chosen.append((lineno, rec))
        entries = []
        found = [(rec, _image_path(rec, root, inp, lineno)) for lineno, rec in chosen]  # fail before any work
        with progress() as prog:
            task = prog.add_task("show", total=len(chosen))
            for rec, img in found:
                pic = P.from_alignment(rec, img) if kind == "alignments" else P.from_caption(rec, img)
                stem = Path(str(rec.get("key") or rec.get("path"))).stem
                name = f"{stem}-{rec['sentid']}.png" if kind == "alignments" else f"{stem}.png"
                n = 1
                while any(name == e[1] for e in entries):
                    n += 1
                    name = f"{Path(name).stem}-{n}.png"
                if not no_png:
                    P.save_png(P.render(pic, side=side), out / name)
                entries.append((pic, name))
                prog.advance(task)
        if not entries:
            raise VsaError("nothing to show (check --key / --split)", inp)
        page = P.write_pictures_page(entries, out, title=f"vsa {kind}: {inp.name}")
        info(f"show: {len(entries)} picture(s) of {len(per_image)} image(s) -> {page}")


def _image_path(rec: dict, root, source: Path, lineno: int) -> Path:
    from vsa.errors import VsaError

    cands = []
    if rec.get("path"):
        p = Path(rec["path"])
        cands += [p, source.parent / p]
    if rec.get("key") and root is not None:
        cands.append(Path(root) / rec["key"])
    for c in cands:
        if c.exists():
            return c
    if not cands:
        raise VsaError("cannot find the image: the record has no 'path' and no image root is set "
                       "(pass --images or set [dataset] images in vsa.toml)", source, lineno)
    raise VsaError(f"image not found (tried {', '.join(map(str, cands))}; pass --images)", source, lineno)
