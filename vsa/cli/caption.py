"""``vsa caption`` (the library: vsa.generator.captioner)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import command_inputs, guarded, warn


@app.command("caption")
@guarded
def caption(
    inputs: Optional[List[str]] = typer.Argument(None, help="Image files or folders; - reads image paths from stdin (one per line). Default: the paths piped in."),
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="Generator checkpoint (default: [mrnn] model in vsa.toml if it exists, else the Flickr8k model shipped with vsa); given twice or more, the generators are decoded as one ensemble (word probabilities averaged)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="With several --model: comma-separated weights, one per generator (default: equal)."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam size (default: the model's, chosen on val)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Maximum words."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="Rank beams by logprob/len^alpha (default: the model's)."),
    mirror: Optional[float] = typer.Option(None, "--mirror", help="Weight of each photo's mirror image, decoded with it as one (test-time augmentation; default: the model's; 0: off, about twice as fast)."),
    as_json: bool = typer.Option(False, "--json", help="JSONL records (docs/formats.md) instead of text lines."),
    coco_results: Optional[Path] = typer.Option(None, "--coco-results", help="Also write COCO results JSON (image_id = position, or dataset imgid with --dataset)."),
    bare: bool = typer.Option(False, "--bare", help="Text mode: print only the caption, without the path and TAB."),
    regions: bool = typer.Option(False, "--regions", help="Also describe each detected region (needs a detector and a region model)."),
    region_model: Optional[Path] = typer.Option(None, "--region-model", help="Region caption model for --regions (`vsa train-mrnn --alignments`; default: the shipped Flickr8k one)."),
    ground: bool = typer.Option(False, "--ground", help="Also cut the caption into snippets, each grounded in a box (whole image = region 0), with the aligner's chain MRF as `vsa align` does (needs a detector)."),
    aligner: Optional[Path] = typer.Option(None, "--aligner", help="Aligner for --ground (default: [align] model in vsa.toml if it exists, else the shipped Flickr8k grounding aligner)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Detector for --regions and --ground, and for a generator trained on detector boxes (default: $VSA_DETECTOR, [regions] detector in vsa.toml, else the YOLOv5n COCO detector inside vsa; loaded only where something reads boxes)."),
    constrain: Optional[bool] = typer.Option(None, "--constrain/--no-constrain", help="Constrained decoding: the caption must name the classes the detector finds with confidence (the two most confident of score >= 0.5; a generator's decoding.constrain* settings). Default: the generator's own choice (made on val)."),
    top: int = typer.Option(5, "--top", help="Regions described per image with --regions."),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    cnn_weights: Optional[Path] = typer.Option(None, "--cnn-weights", help="Local CNN weights for the generator's CNN (default: the packaged EfficientNet-Lite0/Lite2 weights)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn and go on when an image cannot be read."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: caption a deterministic 1/N of the images (1-based K), for cluster arrays."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads (0: all)."),
):
    """Describe images: one line per image, `PATH<TAB>caption` (or --bare, --json, --coco-results)."""
    from vsa.generator.captioner import caption_images, caption_inputs
    from vsa.cli import workspace as W
    from vsa.cli.common import note
    from vsa.cli.common import parse_weights
    from vsa.cli.config import default_model
    from vsa.io import data_stdout, dumps

    items = command_inputs(inputs, "images", "IMAGES... (files or folders)", "image paths (one per line)")
    paths = caption_inputs(items, shard)
    models = list(model or [])
    w = parse_weights(weights, len(models)) if weights is not None else None
    records = caption_images(paths, models if len(models) > 1 else default_model("mrnn", models[0] if models else None, note),
                             weights=w, beam=beam, max_len=max_len,
                             length_penalty=length_penalty, regions=regions, region_model=region_model, ground=ground,
                             aligner=default_model("align", aligner, note, "align-ground") if ground else None,
                             detector=W.detector(detector), top=top,
                             batch_size=batch_size, device=device, cnn_weights=cnn_weights, skip_bad=skip_bad,
                             threads=threads, max_pixels=W.max_pixels(None), jit=W.jit(), warn=warn, mirror=mirror,
                             constrain=constrain)
    results = []
    out = data_stdout().buffer  # the real stdout: the command runs with sys.stdout on stderr (cli.common.guarded)
    for rec in records:
        if as_json:
            out.write(dumps(rec) + b"\n")
        else:
            line = rec["caption"] if bare else f"{rec['path']}\t{rec['caption']}"
            out.write(line.encode("utf-8", "surrogateescape") + b"\n")
            lead = "" if bare else rec["path"]
            for g in rec.get("snippets", []):  # the caption's snippets, in order: where, what, word-region score
                out.write(f"{lead}\t{g['label']} {[round(x) for x in g['box']]}\t{g['text']}\t{g['score']:.3f}\n"
                          .encode("utf-8", "surrogateescape"))
            for r in rec.get("regions", []):
                out.write(f"{lead}\t{r['label']} {[round(x) for x in r['box']]}\t{r['caption']}\n"
                          .encode("utf-8", "surrogateescape"))
        out.flush()
        results.append(rec)
    if coco_results is not None:
        from vsa.io import write_json

        write_json(coco_results, [{"image_id": i, "caption": r["caption"]} for i, r in enumerate(results)])
