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


# ----------------------------------------------------------------------------- a pixel budget across images in flight


class _Live:
    """Counts the pixels of the objects alive now (each registered with its pixels; weakref finalizers subtract
    them when it is freed), and the most ever alive."""

    def __init__(self):
        import threading

        self.now = self.peak = 0
        self.lock = threading.Lock()

    def add(self, obj, n):
        import weakref

        with self.lock:
            self.now += n
            self.peak = max(self.peak, self.now)
        weakref.finalize(obj, self._free, n)
        return obj

    def _free(self, n):
        with self.lock:
            self.now -= n


class _Pixels:
    def __init__(self, n):
        self.n = n


@pytest.mark.parametrize("mode", ["inline", "ahead", "turns"])
def test_budgeted_batches_never_hold_more_decoded_pixels_than_the_budget(mode):
    from concurrent.futures import ThreadPoolExecutor

    from vsa.images import PixelBudget, budgeted_batches

    rng = np.random.default_rng(1)
    costs = [int(c) for c in rng.integers(1, 40, 60)] + [150] + [int(c) for c in rng.integers(1, 40, 20)]
    live = _Live()
    budget = PixelBudget(100)
    over_alone = []

    def load(i):
        obj = live.add(_Pixels(costs[i]), costs[i])
        if costs[i] > budget.total:
            over_alone.append(live.now == costs[i])  # an item over the budget runs alone
        return i, obj

    pool = None if mode == "inline" else ThreadPoolExecutor(3)
    got, sizes = [], []
    try:
        for batch in budgeted_batches(len(costs), costs.__getitem__, load, budget, batch_size=8, pool=pool, window=6,
                                      turns=mode == "turns"):
            assert live.now <= max(budget.total, max(c for c in costs)) and len(batch) <= 8
            if live.now > budget.total:
                assert [costs[i] for i, _ in batch] == [150]
            got += [i for i, _ in batch]
            sizes.append(len(batch))
    finally:
        if pool is not None:
            pool.shutdown()
    assert got == list(range(len(costs)))  # all, in order
    assert over_alone == [True] and budget.used == 0 and budget.items == 0
    assert live.peak <= 150 and max(sizes) > 1  # batches still form when the pixels allow it
    assert budget.peak <= 150


def _pngs(folder: Path, sizes) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"im{i:02d}.png"
        Image.new("RGB", (w, h), (i * 20 % 255, 100, 50)).save(p)
        files.append((p, p.name))
    return files


def _count_decoded(monkeypatch):
    """Count the decoded images alive, in pixels, whoever decodes them (in this process)."""
    import vsa.images as vimg

    live = _Live()
    real = vimg.open_image

    def counted(path, max_pixels=None):
        im = real(path, max_pixels)
        return live.add(im, im.size[0] * im.size[1])

    monkeypatch.setattr(vimg, "open_image", counted)
    return live


def test_image_batches_hold_at_most_the_budget_of_decoded_pixels(tmp_path, monkeypatch):
    from vsa.images import image_batches, iter_images

    files = _pngs(tmp_path, [(300, 200)] * 10 + [(900, 700)] + [(300, 200)] * 5)  # 60000 pixels each, one 630000
    live = _count_decoded(monkeypatch)
    unbounded = [len(b) for b in image_batches(files, batch_size=16)]
    assert unbounded == [16] and live.peak == 15 * 60000 + 630000  # the default budget: the whole batch at once
    live.peak = 0
    budget = 3 * 60000 + 1000
    kept = []
    for batch in image_batches(files, batch_size=16, budget=budget):
        assert live.now <= max(budget, 630000)
        kept.append([k for _, k, _, _ in batch])
    assert live.peak == 630000  # the big image alone; three small ones otherwise
    assert [len(b) for b in kept] == [3, 3, 3, 1, 1, 3, 2] and sum(kept, []) == [k for _, k in files]
    live.peak = 0
    keys = []
    for _, k, im, err in iter_images(files, budget=budget):
        keys.append(k)
    assert keys == [k for _, k in files] and live.peak <= 630000 + 60000  # and the one the loop variable holds


def test_image_batches_in_worker_processes_keep_to_the_budget(tmp_path):
    from vsa.images import PixelBudget, image_batches

    bad = tmp_path / "bad.png"
    files = _pngs(tmp_path, [(300, 200)] * 7 + [(900, 700)])  # the last over a quarter of the budget: decoded here
    bad.write_bytes(b"\x89PNG broken")
    files.insert(3, (bad, "bad.png"))
    budget = PixelBudget(700000)
    got = [(k, im.size if im is not None else err) for b in image_batches(files, 16, workers=2, budget=budget)
           for _, k, im, err in b]
    assert [k for k, _ in got] == [k for _, k in files] and "bad.png" in str(got[3][1])
    assert got[-1][1] == (900, 700) and budget.peak <= budget.total and budget.used == 0


def test_regions_detect_only_a_budget_of_pixels_at_a_time(tmp_path, monkeypatch):
    """`vsa regions`' batches: the detector sees, and the process holds, at most the budget of decoded pixels,
    whatever the batch size (four 13300 x 13300 PNGs of 21 KB took 7 GB before)."""
    from vsa.regions import detect_files

    files = _pngs(tmp_path, [(400, 300)] * 9)  # 120000 pixels each
    live = _count_decoded(monkeypatch)
    seen = []

    class Detector:
        name = "fake"

        def detect(self, images, opt):
            seen.append((len(images), live.now))
            return [[] for _ in images]

    recs = [r["key"] for r, err in detect_files(Detector(), files, batch_size=16, workers=0, budget=250000)]
    assert recs == [k for _, k in files]
    assert [n for n, _ in seen] == [2, 2, 2, 2, 1] and max(now for _, now in seen) <= 250000
    assert live.peak <= 250000


@pytest.mark.slow
def test_no_detected_image_stays_alive_after_its_batch(yolov5n, flickr8k, tmp_path):
    """In a fresh process (as `vsa regions` runs), each batch's images are freed once detected. The first
    detections used to import torchvision's NMS under the batch's frames, which that import left in a reference
    cycle: the first batch's images stayed until the cycle collector happened to run (0.5 GB a 13300 px photo)."""
    import subprocess
    import sys

    files = sorted((flickr8k / "images").glob("*.jpg"))[:3]
    code = (
        "import gc, sys, weakref\ngc.disable()  # frames caught in a reference cycle stay: no luck of the collector\n"
        "import vsa.images as vimg\nfrom vsa.regions import detect_files, load_detector\n"
        "live, real = [], vimg.open_image\n"
        "def counted(p, m=None):\n    im = real(p, m)\n    live.append(weakref.ref(im))\n    return im\n"
        "vimg.open_image = counted\n"
        "det = load_detector(sys.argv[1], 'cpu')\n"
        "for r, _ in detect_files(det, [(p, p) for p in sys.argv[2:]], batch_size=1, workers=0):\n"
        "    print(len(r['regions']), sum(r() is not None for r in live))\n")
    r = subprocess.run([sys.executable, "-c", code, str(yolov5n), *map(str, files)], capture_output=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    rows = [tuple(map(int, ln.split())) for ln in r.stdout.decode().splitlines()[-3:]]  # after what libraries print
    assert all(n > 1 for n, _ in rows)  # detections were made (the whole image and more)
    assert [alive for _, alive in rows] == [0, 0, 0]  # none outlived its batch (records hold no image)
