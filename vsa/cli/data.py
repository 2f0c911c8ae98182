from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, warn
from vsa.cli.workspace import open_dataset

data_app = typer.Typer(help="Caption datasets: statistics and conversion to Karpathy JSON.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _min_count(value: Optional[int]) -> int:
    from vsa.cli.config import resolve
    from vsa.errors import VsaError

    mc = resolve(value, "dataset.min_count", "--min-count", default=5)
    if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
        raise VsaError(f"min_count must be a positive integer, got {mc!r}")
    return mc


@data_app.command("stats")
@guarded
def stats_cmd(
    dataset: Optional[Path] = typer.Argument(None, help="Dataset file or folder (default: [dataset] path in vsa.toml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root folder."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Folder with split list files (*train*.txt, *val*.txt, *test*.txt)."),
    min_count: Optional[int] = typer.Option(None, "--min-count", help="Vocabulary threshold (default: [dataset] min_count, else 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the val/test split when the layout has none."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Images and sentences per split, vocabulary size, sentence lengths."""
    from vsa.data import stats

    from vsa.data import SPECIALS

    ds = open_dataset(dataset, images, splits, seed)
    st = stats(ds, _min_count(min_count))
    st["vocab_size_with_specials"] = st["vocab_size"] + len(SPECIALS)  # what the trainers report as "vocabulary"
    if as_json:
        from vsa.io import write_json

        write_json("-", st)
        return
    from rich.table import Table

    from vsa.cli.common import data_console

    t = Table(title=f"{st['dataset']} ({st['layout']}: {st['source']})")
    for col in ("split", "images", "sentences", "per image", "words mean", "median", "min", "max"):
        t.add_column(col, justify="right" if col != "split" else "left", no_wrap=True)
    for sp, d in st["splits"].items():
        t.add_row(sp, str(d["images"]), str(d["sentences"]), f"{d['sentences_per_image']:g}", f"{d['length_mean']:.2f}",
                  f"{d['length_median']:g}", str(d["length_min"]), str(d["length_max"]))
    out = data_console(width=max(data_console().width, 88))  # the table is this command's data: stdout
    out.print(t)
    out.print(f"vocabulary: {st['vocab_size']} words seen >= {st['min_count']} times in train "
              f"({st['train_words_distinct']} distinct train words); with the {len(SPECIALS)} special tokens "
              f"every model adds ({' '.join(SPECIALS)}), {st['vocab_size_with_specials']}: the size the trainers "
              f"report", highlight=False, markup=False, soft_wrap=True)


@data_app.command("convert")
@guarded
def convert_cmd(
    dataset: Optional[Path] = typer.Argument(None, help="Dataset file or folder in any supported layout (default: [dataset] path in vsa.toml)."),
    out: str = typer.Option("-", "-o", "--out", help="Output Karpathy JSON (default stdout)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root folder."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Folder with split list files (*train*.txt, *val*.txt, *test*.txt)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the val/test split when the layout has none."),
):
    """Write canonical Karpathy split JSON from any supported layout."""
    from vsa.io import write_json

    ds = open_dataset(dataset, images, splits, seed)
    write_json(out, ds.to_karpathy())
    if out != "-":
        info(f"wrote {out}: {len(ds.images)} images, {sum(len(r.sentences) for r in ds.images)} sentences")
