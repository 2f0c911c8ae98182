"""``vsa score``: image-sentence scores (the library: vsa.alignment.model, vsa.search)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, table_console, warn
from vsa.cli.workspace import CNN_HELP, DETECTOR_HELP, MODEL_HELP, aligner as _aligner, default_aligner as _default_model, encoder as _encoder, max_pixels, say_oov as _say_oov


def _print_score(rec: dict) -> None:
    """The score, then each word's best region (by name: ``whole image``, ``dog #2``), its box and word-region
    score ``v.s``; file names and words whole."""
    from rich.markup import escape
    from rich.table import Table

    from vsa.search import region_name

    out = table_console()
    out.print(escape(f"{rec['image']}: score {rec['score']:.3f}"), highlight=False)
    if not rec.get("words"):
        return
    t = Table()
    t.add_column("word", overflow="fold")
    t.add_column("best region", overflow="fold")
    t.add_column("box", justify="right", no_wrap=True)
    t.add_column("v.s", justify="right", no_wrap=True)
    for w in rec["words"]:
        t.add_row(escape(w["word"] if w["known"] else f"{w['word']} (unknown)"), escape(region_name(w["label"], w["region"])),
                  " ".join(f"{v:.0f}" for v in w["box"]), f"{w['dot']:.3f}")
    out.print(t)


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
    from vsa.cli.common import stdin_is_terminal
    from vsa.io import JsonlWriter, iter_jsonl, write_jsonl
    from vsa.search import score_pairs, score_photo

    aligner = _aligner(_default_model(model), device)
    store = None
    if features is not None:
        from vsa.features.store import load_features

        store = load_features(features)
    encoder = _encoder(aligner, detector, top, device, cnn_weights)
    limit = max_pixels(None)

    if image is not None:
        if sentence is None:
            raise VsaError("give a sentence after the photo: vsa score IMAGE \"a dog runs\"")
        rec = score_photo(aligner, encoder, image, sentence, store=store, max_pixels=limit)
        _say_oov(rec["oov"], "", rec["read_as"])
        if as_json:
            write_jsonl("-", [rec])
        else:
            _print_score(rec)
        return
    if stdin_is_terminal():
        raise VsaError("no photo given: pass IMAGE SENTENCE, or pipe JSONL {\"image\": ..., \"sentence\": ...} on stdin")
    pairs = iter_jsonl("-", skip_bad=skip_bad, warn=warn, with_lineno=True)
    with JsonlWriter("-") as w:
        for line, rec in score_pairs(aligner, encoder, pairs, store=store, skip_bad=skip_bad, warn=warn, max_pixels=limit):
            _say_oov(rec["oov"], f"<stdin>:{line}: ", rec["read_as"])
            w.write(rec)
