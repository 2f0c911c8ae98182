"""Constrained decoding with the shipped generator and the packaged detector on a photo that is not from
Flickr8K (ultralytics' own bus.jpg), offline: the caption names what the detector sees."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from vsa.cli import app


@pytest.fixture(scope="module")
def bus() -> Path:
    import ultralytics

    p = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    if not p.exists():
        pytest.skip("ultralytics ships no assets/bus.jpg in this install")
    return p


@pytest.mark.slow
def test_caption_constrain_names_what_the_detector_sees(bus, tmp_path):
    from vsa.generator.captioner import caption_images

    rec, = caption_images([(bus, "bus.jpg")], constrain=True, device="cpu")
    # the default setting (chosen on val): the most confident class that is not a person; the people in the photo
    # are named by the generator itself
    assert rec["constraints"] == ["bus"]
    words = rec["caption"].split()
    assert "bus" in words and {"man", "woman", "people", "person", "men", "women"} & set(words), rec["caption"]
    # --no-constrain: no constraints recorded; the CLI flag reaches the library
    r = CliRunner().invoke(app, ["caption", str(bus), "--no-constrain", "--coco-results", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output[-800:]
    assert orjson.loads((tmp_path / "c.json").read_bytes())[0]["caption"] != ""
