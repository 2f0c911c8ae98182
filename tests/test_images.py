"""Image robustness (issue 8): every odd file is converted to upright RGB or refused with a one-line error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from vsa.errors import VsaError
from vsa.images import ImageError, find_images, iter_images, open_image


def _jpeg(path: Path, size=(64, 48), color=(200, 30, 30)) -> Path:
    Image.new("RGB", size, color).save(path, "JPEG", quality=95)
    return path


def test_rgb_jpeg_roundtrip(tmp_path):
    im = open_image(_jpeg(tmp_path / "a.jpg"))
    assert im.mode == "RGB" and im.size == (64, 48)
    r, g, b = im.getpixel((10, 10))
    assert r > 180 and g < 60 and b < 60


def test_truncated_jpeg_names_file(tmp_path):
    p = _jpeg(tmp_path / "trunc.jpg", size=(256, 256))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError) as e:
        open_image(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    assert "truncated" in msg or "cannot decode" in msg


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        open_image(p)


def test_non_image_with_image_extension(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image") as e:
        open_image(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "nope.jpg")


def test_png_alpha_composited_on_white(tmp_path):
    a = np.zeros((10, 20, 4), np.uint8)
    a[:, :10] = (0, 0, 255, 255)  # opaque blue left half
    a[:, 10:] = (255, 0, 0, 0)  # fully transparent (red) right half
    p = tmp_path / "alpha.png"
    Image.fromarray(a, "RGBA").save(p)
    im = open_image(p)
    assert im.mode == "RGB"
    assert im.getpixel((2, 5)) == (0, 0, 255)
    assert im.getpixel((15, 5)) == (255, 255, 255)


def test_palette_with_transparency_and_grayscale(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.save(tmp_path / "pal.png", transparency=0)
    im = open_image(tmp_path / "pal.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (0, 255, 0)
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    im = open_image(tmp_path / "gray.png")
    assert im.mode == "RGB" and im.getpixel((3, 3)) == (77, 77, 77)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.zeros((4, 8), np.uint16)
    a[:, 4:] = 40000  # would clip to 255 everywhere with a naive cast
    a[:, :4] = 1000
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    im = open_image(p)
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((7, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, "JPEG", quality=95)  # red in CMYK
    im = open_image(p)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation_applied(tmp_path):
    base = Image.new("RGB", (40, 20), (0, 0, 0))
    base.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to view
    p = tmp_path / "rot.jpg"
    base.save(p, "JPEG", exif=exif.tobytes(), quality=95)
    im = open_image(p)
    assert im.size == (20, 40)  # upright: width and height swapped
    assert sum(im.getpixel((10, 2))) > 600  # the stripe is now at the top
    assert sum(im.getpixel((10, 37))) < 100


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("L", (200, 100)).save(p)
    with pytest.raises(ImageError, match="--max-pixels") as e:
        open_image(p, max_pixels=10_000)
    assert "20000" in str(e.value)
    assert open_image(p, max_pixels=20_000).size == (200, 100)
    # the library reads no environment: $VSA_MAX_PIXELS is the CLI's (vsa.cli.workspace.max_pixels)
    from vsa.cli.workspace import max_pixels

    monkeypatch.setenv("VSA_MAX_PIXELS", "5000")
    assert open_image(p).size == (200, 100)
    assert max_pixels(None) == 5000 and max_pixels(20_000) == 20_000
    with pytest.raises(ImageError, match="VSA_MAX_PIXELS"):
        open_image(p, max_pixels(None))
    monkeypatch.setenv("VSA_MAX_PIXELS", "1e6")
    assert open_image(p, max_pixels(None)).size == (200, 100)
    monkeypatch.setenv("VSA_MAX_PIXELS", "lots")
    with pytest.raises(VsaError, match="VSA_MAX_PIXELS must be a number of pixels, got 'lots'"):
        max_pixels(None)
    monkeypatch.delenv("VSA_MAX_PIXELS")
    from vsa.images import DEFAULT_MAX_PIXELS

    assert max_pixels(None) == DEFAULT_MAX_PIXELS


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    im = open_image(tmp_path / "dot.png")
    assert im.size == (1, 1) and im.getpixel((0, 0)) == (1, 2, 3)


def test_find_images_keys_loops_and_non_utf8_names(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    _jpeg(root / "b.jpg")
    _jpeg(root / "sub" / "a.PNG")  # extension case does not matter (content is JPEG: fine for discovery)
    (root / "readme.txt").write_text("x")
    os.symlink(root, root / "sub" / "loop")  # symlink loop back to the top
    raw = os.path.join(os.fsencode(root), b"caf\xe9.jpg")  # latin-1 name, not valid UTF-8
    Image.new("RGB", (5, 5)).save(open(raw, "wb"), "JPEG")
    found = find_images([root])
    keys = [k for _, k in found]
    assert sorted(keys) == sorted(["b.jpg", "sub/a.PNG", os.fsdecode(b"caf\xe9.jpg")])
    for path, _ in found:
        assert open_image(path).mode == "RGB"
    # a file given directly keeps its file name as key
    assert find_images([root / "sub" / "a.PNG"]) == [(root / "sub" / "a.PNG", "a.PNG")]
    with pytest.raises(ImageError, match="no such file"):
        find_images([root / "missing"])


def test_worker_errors_come_back_as_the_same_line(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    files = [(good, "good.jpg"), (bad, "bad.jpg")]
    in_process = [(k, err) for _, k, _, err in iter_images(files, workers=0)]
    in_worker = [(k, err) for _, k, _, err in iter_images(files, workers=1)]
    assert in_process == in_worker
    assert in_process[0] == ("good.jpg", None)
    assert str(bad) in in_process[1][1]


def test_cli_reports_broken_image_by_name(tmp_path):
    _jpeg(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    r = run_cli("embed", tmp_path, "-o", tmp_path / "f.npz", "--threads", "1")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "broken.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "f.npz").exists()
    r = run_cli("embed", tmp_path, "-o", tmp_path / "f.npz", "--skip-bad", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert "warning" in r.stderr.decode() and "broken.jpg" in r.stderr.decode()
    assert list(np.load(tmp_path / "f.npz")["keys"]) == ["ok.jpg"]


def test_ultralytics_pil_patch_is_bypassed(tmp_path, capfd):
    """Importing ultralytics wraps PIL.Image.open (pip-installs a HEIF plugin, prints to stdout); we do not use it."""
    pytest.importorskip("ultralytics")
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)

    capfd.readouterr()  # this import's own output (a fresh HOME: "Creating new Ultralytics Settings"), not open_image's
    p = tmp_path / "fake.jpg"
    p.write_bytes(b"plain text, not a JPEG")
    with pytest.raises(ImageError, match="not an image"):
        open_image(p)
    out, _ = capfd.readouterr()
    assert out == ""


def test_missing_ok_keeps_missing_files_for_skip_bad(tmp_path):
    assert find_images([tmp_path / "gone.jpg"], missing_ok=True) == [(tmp_path / "gone.jpg", "gone.jpg")]
