from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, progress, warn


@app.command("align")
@guarded
def align(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Aligner checkpoint (default: [align] model in vsa.toml, else the shipped one)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root folder (only for the dataset loader)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Region features NPZ (default: [features] regions in vsa.toml)."),
    split: str = typer.Option("train", "--split", help="train, val, test, restval, train+restval or all."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Reward for neighbouring words on the same region; larger gives longer snippets (default: the aligner's own, chosen on val and saved in it, else 0.05; see docs/alignment-snippets.md)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output JSONL (default: [align] alignments in vsa.toml, else stdout; '-' for stdout)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Ignore the finished part of an earlier run."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Skip dataset images that have no features (default: error)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N image-sentence pairs."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: align a deterministic 1/N of the pairs (1-based K); concatenating shards 1..N in order gives one run's output."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = torch default)."),
):
    """Snippet alignment (chain MRF, exact Viterbi) of every sentence to its image's regions, as JSONL.

    One line per image-sentence pair: the sentence cut into snippets, each with its word span, text,
    region index, box, label and mean word-region score. Resumable: rerun with the same -o.
    """
    from vsa.cli.data_cmd import open_dataset
    from vsa.config import resolve, workspace
    from vsa.errors import VsaError
    from vsa.featstore import load_features
    from vsa.io import JsonlWriter, is_stdio
    from vsa.mrf import snippet_stats
    from vsa.snippets import align_to_file, aligner_beta, check_extractor, iter_alignments, pairs_of

    if beta is not None and beta < 0:
        raise VsaError(f"--beta must be >= 0, got {beta}")
    if out is None:
        out = workspace().get("align.alignments")
    to_stdout = out is None or is_stdio(out)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from vsa.align import load_aligner

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from vsa.cli.common import note
    from vsa.config import default_model

    aligner = load_aligner(default_model("align", model, note), device=device)
    beta = aligner_beta(aligner, beta)  # --beta, else the aligner's own (a val sweep, saved in it), else the default
    feats_path = resolve(features, "features.regions", "--features")
    store = load_features(feats_path)
    check_extractor(aligner.extractor_meta, store.meta, feats_path)
    ds = open_dataset(dataset, images)
    if split not in ("all", "train+restval") and not ds.split(split):
        raise VsaError(f"split {split!r} has no images in {ds.source}")
    recs = ds.images if split == "all" else ds.split(split)
    keep = {r.key for r in store.check_dataset(recs, skip_missing=skip_missing, warn=warn)}
    pairs = [(r, s) for r, s in pairs_of(ds, split) if r.key in keep]
    if limit is not None:
        pairs = pairs[:limit]
    if shard:
        from vsa.features import shard_of

        pairs = shard_of(pairs, shard)
    if to_stdout:
        with progress() as prog, JsonlWriter("-") as w:
            task = prog.add_task("align", total=len(pairs))
            recs_out = []
            for r in iter_alignments(aligner, store, pairs, beta, on_pair=lambda: prog.advance(task)):
                w.write(r)
                recs_out.append({"snippets": r["snippets"]})
        st = snippet_stats(recs_out)
        where = "stdout"
    else:
        import signal

        from vsa.snippets import part_path

        def _term(*_):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, _term)
        try:
            with progress() as prog:
                res = align_to_file(aligner, store, pairs, Path(out), beta, resume=not no_resume, warn=warn, progress=prog)
        except KeyboardInterrupt:
            part = part_path(Path(out))
            n = sum(1 for _ in open(part, "rb")) if part.exists() else 0
            raise VsaError(f"interrupted; {n} finished pair(s) kept in {part} ({out} untouched); "
                           "rerun the same command to resume") from None
        finally:
            signal.signal(signal.SIGTERM, old_term)
        st = snippet_stats(res["records"])
        where = f"{out} ({res['resumed']} resumed)"
    info(f"align: {st['sentences']} pairs -> {where}; beta {beta:g}: {st['snippets_per_sentence']:.2f} snippets/sentence, "
         f"mean length {st['mean_length']:.2f} words, {100 * st['whole_image_share']:.1f}% on the whole image, "
         f"{100 * st['object_share']:.1f}% on object boxes")


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
            from vsa.cli.data_cmd import open_dataset
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
