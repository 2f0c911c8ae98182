"""``vsa search index|text|sentences`` (the library: vsa.search)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, table_console, warn
from vsa.cli.workspace import CNN_HELP, DETECTOR_HELP, MODEL_HELP, aligner as _aligner, default_aligner as _default_model, encoder as _encoder, max_pixels, say_oov as _say_oov

search_app = typer.Typer(help="Index a folder of photos once; rank photos for a text query, or sentences for a photo.",
                         no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                         rich_markup_mode=None)
app.add_typer(search_app, name="search")


@search_app.command("index")
@guarded
def search_index(
    photos: Optional[List[Path]] = typer.Argument(None, help="Photo files and/or folders (searched recursively)."),
    out: Path = typer.Option(Path("index.npz"), "--out", "-o", help="Index file to write."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="Index the images of this features NPZ instead of running the detector and CNN on photos."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="With --features: only the images of this dataset (and --split)."),
    split: Optional[str] = typer.Option(None, "--split", help="With --features and --dataset: which split (e.g. test)."),
    detector: Optional[str] = typer.Option(None, "--detector", help=DETECTOR_HELP),
    top: int = typer.Option(19, "--top", help="Detections per photo (plus the whole image)."),
    cnn_weights: Optional[Path] = typer.Option(None, "--cnn-weights", help=CNN_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn and go on past unreadable photos."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
):
    """Detect, embed and project every photo once into an index file."""
    from vsa.cli.common import progress
    from vsa.search import build_index, index_inputs, save_index

    from vsa.io import output_lock

    with output_lock(out, "vsa search index"):  # one writer per index: a second run on the same -o is refused
        aligner = _aligner(_default_model(model), device)
        if features is not None:
            from vsa.features.store import load_features

            store = load_features(features)
            ds = None
            if dataset is not None or split is not None:
                from vsa.cli.workspace import open_dataset

                ds = open_dataset(dataset)
            items = build_index(aligner, None, store=store, dataset=ds, split=split, skip_bad=skip_bad, warn=warn)
        else:
            inputs = index_inputs(photos)
            encoder = _encoder(aligner, detector, top, device, cnn_weights)
            with progress() as prog:
                items = build_index(aligner, inputs, encoder, progress=prog, skip_bad=skip_bad, warn=warn,
                                    max_pixels=max_pixels(None))
        save_index(out, aligner, items)
    info(f"indexed {len(items)} photos -> {out}")


def _index_model(model: Optional[Path], idx) -> Path:
    """--model, else the aligner the index was built with, else the default aligner."""
    if model is None and idx.meta.get("model") and Path(idx.meta["model"]).is_file():
        return Path(idx.meta["model"])
    return _default_model(model)


@search_app.command("text")
@guarded
def search_text_cmd(
    query: str = typer.Argument(..., help="What to look for, e.g. \"a dog jumping into a lake\"."),
    index: Path = typer.Option(Path("index.npz"), "--index", "-i", help="Index from `vsa search index`."),
    k: int = typer.Option(10, "-k", "--top-k", help="How many photos to list."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Aligner checkpoint (default: the index's)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout instead of a table."),
    rerank: Optional[Path] = typer.Option(None, "--rerank", help="Generator checkpoint that re-ranks the aligner's best photos by log p(query | photo) (docs/alignment.md)."),
    rerank_features: Optional[Path] = typer.Option(None, "--rerank-features", help="Features NPZ of the --rerank generator holding the indexed photos (default: made from the photo files)."),
    rerank_k: Optional[int] = typer.Option(None, "--rerank-k", help="Photos re-ranked (default: RerankConfig.k, 20, or -k if larger)."),
    rerank_weight: Optional[float] = typer.Option(None, "--rerank-weight", help="The generator's weight against the aligner's, both standardised over the list (default: RerankConfig.weight, 4)."),
    cnn_weights: Optional[Path] = typer.Option(None, "--cnn-weights", help="With --rerank: " + CNN_HELP),
    no_hubness: bool = typer.Option(False, "--no-hubness", help="Rank by the aligner's score alone, though the index holds hubness terms (docs/alignment.md)."),
):
    """Rank the indexed photos for a text query."""
    from vsa.cli.workspace import rerank_config
    from vsa.io import write_jsonl
    from vsa.search import Index, search_text

    rcfg = rerank_config(rerank, rerank_k, rerank_weight, rerank_features)
    idx = Index(index)
    aligner = _aligner(_index_model(model, idx), "cpu")
    idx.check_model(aligner)
    hits = search_text(aligner, idx, query, k if rcfg is None else max(k, rcfg.k), hubness=not no_hubness)
    if rcfg is not None:
        from vsa.generator.captioner import Captioner
        from vsa.search import rerank_text

        store = None
        if rerank_features is not None:
            from vsa.features.store import load_features

            store = load_features(rerank_features)
        gen = Captioner.load(rerank, "cpu", cnn_weights)
        hits = rerank_text(hits, query, gen, store, k, rcfg.weight, max_pixels(None))
    _say_oov(hits[0]["oov"] if hits else [], "", hits[0]["read_as"] if hits else None)
    if as_json:
        write_jsonl("-", hits)
        return
    from rich.markup import escape
    from rich.table import Table

    from vsa.search import region_names, words_by_region

    out = table_console()
    t = Table()
    for c in ("rank", "score") + (("aligner rank", "log p") if rcfg else ()):
        t.add_column(c, justify="right", no_wrap=True)
    # whole file names where the terminal has room for them, else folded; never cut short
    t.add_column("photo", overflow="fold", min_width=min(max([len(h["path"]) for h in hits] + [5]), out.width // 2))
    t.add_column("words -> best region", overflow="fold")
    for h in hits:
        words = ""
        if h.get("words"):
            words = words_by_region(h["words"], region_names(idx.store.labels(h["key"]) or []) or None)
        extra = (str(h["aligner_rank"]), f"{h['logp']:.2f}") if rcfg else ()
        t.add_row(str(h["rank"]), f"{h['score']:.3f}", *extra, escape(h["path"]), escape(words))
    out.print(escape(f"{query!r}: {len(idx)} photos" + (f", re-ranked by {rerank}" if rcfg else "")), highlight=False)
    out.print(t)


@search_app.command("sentences")
@guarded
def search_sentences_cmd(
    image: str = typer.Argument(..., help="A photo (or, with --index, the key of an indexed photo)."),
    corpus: Path = typer.Option(..., "--corpus", "-c", help="Sentences to rank, one per line ('-' = stdin)."),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help="Take the photo's regions from this index when it holds it."),
    k: int = typer.Option(10, "-k", "--top-k", help="How many sentences to list."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    detector: Optional[str] = typer.Option(None, "--detector", help=DETECTOR_HELP),
    top: int = typer.Option(19, "--top", help="Detections per photo (plus the whole image)."),
    cnn_weights: Optional[Path] = typer.Option(None, "--cnn-weights", help=CNN_HELP),
    no_hubness: bool = typer.Option(False, "--no-hubness", help="Rank by the aligner's score alone, though it has an image bank (docs/alignment.md)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout instead of a table."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
):
    """Rank the sentences of a corpus for one photo (image annotation by retrieval)."""
    from vsa.io import write_jsonl
    from vsa.search import Index, read_corpus, search_sentences

    photo, aligner = None, None
    if index is not None:
        idx = Index(index)
        aligner = _aligner(_index_model(model, idx), device)
        photo = idx.find_photo(image, aligner)
    aligner = aligner or _aligner(_default_model(model), device)
    if photo is None:
        photo = _encoder(aligner, detector, top, device, cnn_weights).encode(image, max_pixels=max_pixels(None))
    hits = search_sentences(aligner, photo, read_corpus(corpus), k, hubness=not no_hubness)
    for h in hits:
        _say_oov(h["oov"], f"rank {h['rank']} (line {h['line']}): ", h["read_as"])
    if as_json:
        write_jsonl("-", hits)
        return
    from rich.markup import escape
    from rich.table import Table

    t = Table()
    for c in ("rank", "score"):
        t.add_column(c, justify="right", no_wrap=True)
    t.add_column("sentence", overflow="fold")
    for h in hits:
        t.add_row(str(h["rank"]), f"{h['score']:.3f}", escape(h["sentence"]))
    out = table_console()
    out.print(escape(str(photo.path)), highlight=False)
    out.print(t)
