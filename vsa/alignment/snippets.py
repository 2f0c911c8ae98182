"""``vsa align``: snippet alignments of a dataset split, streamed and resumable.

For every image-sentence pair of a split: the aligner's word-region scores ``[T, R]``
(:meth:`vsa.alignment.model.Aligner.word_region_scores`), the chain MRF (:mod:`vsa.alignment.mrf`), and one JSONL
record (docs/formats.md, "Alignments JSONL").

Written to a file, work goes first into ``<out>.part`` (one record per line, appended as it is
made); a rerun with the same output skips the pairs already there, and the final file is written
atomically in dataset order at the end, after which the part is removed.  An interrupted run
(Ctrl-C, kill) leaves any earlier ``<out>`` untouched and the part for the next run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from vsa.errors import VsaError, writing
from vsa.features.store import check_extractor
from vsa.io import is_number
from vsa.alignment.mrf import alignment_record


def pairs_of(ds, split: str) -> list[tuple]:
    """``(ImageRecord, Sentence)`` pairs of one split (``all``: every split), in dataset order."""
    recs = ds.images if split == "all" else ds.split(split)
    return [(r, s) for r in recs for s in r.sentences]


def word_region_scores(aligner, feats: np.ndarray, tokens: list[str], cache: dict) -> np.ndarray:
    """``[T, R]`` word-region scores; a trained region aligner (:class:`vsa.alignment.model.Aligner`) computes the image side
    once per image, any other scorer gives :meth:`word_region_scores` of each pair."""
    from vsa.alignment.model import Aligner

    if isinstance(aligner, Aligner) and aligner.cfg.model == "brnn":
        if "V" not in cache:
            cache["V"] = aligner.image_vectors(feats)
        if not tokens:
            return np.zeros((0, len(feats)), dtype=np.float32)
        return aligner.word_vectors(tokens) @ cache["V"].T
    return np.asarray(aligner.word_region_scores(feats, tokens))


def aligner_beta(aligner, beta: float | None = None) -> float:
    """The MRF's beta: ``beta`` if given, else the aligner's own (chosen on val, in its checkpoint's
    ``decoding``), else :data:`vsa.alignment.mrf.DEFAULT_BETA`."""
    from vsa.alignment.mrf import DEFAULT_BETA

    if beta is not None:
        return float(beta)
    return float(aligner.decoding.get("beta", DEFAULT_BETA))


def ground_sentence(aligner, photo, tokens: list[str], beta: float | None = None) -> list[dict]:
    """Snippets of any tokenised sentence (a generated caption, a query) on the regions of one photo
    (:class:`vsa.search.Photo`, whole image first): the snippet dicts of an alignment record, made by the
    same word-region scores and chain MRF as ``vsa align``, over the aligner's first ``max_regions`` regions."""
    from vsa.alignment.model import region_rows

    R = region_rows(aligner.cfg)
    U = word_region_scores(aligner, photo.feats[:R], list(tokens), {})
    rec = alignment_record(photo.key, 0, "", list(tokens), U, aligner_beta(aligner, beta), photo.boxes[:R],
                           list(photo.labels[:R]))
    return rec["snippets"]


def iter_alignments(aligner, store, pairs: Iterable[tuple], beta: float, done: set | None = None,
                    on_pair: Callable[[], None] | None = None) -> Iterator[dict]:
    """Yield one alignment record per pair not in ``done`` (a set of ``(key, sentid)``)."""
    cur_key, cache, feats, boxes, labels = None, {}, None, None, None
    for rec, sent in pairs:
        if done and (rec.key, sent.sentid) in done:
            if on_pair:
                on_pair()
            continue
        if rec.key != cur_key:
            cur_key, cache = rec.key, {}
            feats = store[rec.key]
            boxes = store.boxes(rec.key)
            labels = store.labels(rec.key)
        U = word_region_scores(aligner, feats, sent.tokens, cache)
        yield alignment_record(rec.key, sent.sentid, rec.split, sent.tokens, U, beta, boxes, labels)
        if on_pair:
            on_pair()


def part_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".part")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_snippets(snippets, n_words: int, source=None, line: int | None = None) -> list[dict]:
    """``snippets`` as an alignment record holds them (docs/formats.md, "Alignments JSONL"): objects with whole
    ``start`` < ``end`` within the ``n_words`` words, a whole ``region`` >= 0, and where present a ``box`` of 4
    numbers, a ``label`` and ``text`` string, a numeric ``score``. Returns them; a one-line VsaError naming
    ``source``:``line`` and the snippet otherwise."""
    if not isinstance(snippets, list):
        raise VsaError(f"'snippets' must be a list, got {snippets!r:.60}", source, line)
    for k, sn in enumerate(snippets, 1):
        what = f"snippet {k}"
        if not isinstance(sn, dict):
            raise VsaError(f"{what} must be an object, got {sn!r:.60}", source, line)
        start, end = sn.get("start"), sn.get("end")
        if not (_whole(start) and _whole(end) and 0 <= start < end <= n_words):
            raise VsaError(f"{what}: 'start' and 'end' must be whole numbers with 0 <= start < end <= {n_words} "
                           f"(the words), got {start!r:.30} and {end!r:.30}", source, line)
        r = sn.get("region")
        if not (_whole(r) and r >= 0):
            raise VsaError(f"{what}: 'region' must be a whole number >= 0, got {r!r:.60}", source, line)
        box = sn.get("box")
        if box is not None and not (isinstance(box, list) and len(box) == 4 and all(is_number(x) for x in box)):
            raise VsaError(f"{what}: 'box' must be 4 numbers [x1, y1, x2, y2], got {box!r:.80}", source, line)
        for name in ("label", "text"):
            if sn.get(name) is not None and not isinstance(sn[name], str):
                raise VsaError(f"{what}: '{name}' must be a string, got {sn[name]!r:.60}", source, line)
        if sn.get("score") is not None and not is_number(sn["score"]):
            raise VsaError(f"{what}: 'score' must be a number, got {sn['score']!r:.60}", source, line)
    return snippets


def check_alignment_record(rec, source=None, line: int | None = None) -> dict:
    """One line of ``vsa align``'s output, checked as its readers use it (docs/formats.md, "Alignments JSONL"):
    a non-empty string ``key``, a whole ``sentid``, a list of string ``tokens``, ``snippets`` on them
    (:func:`check_snippets`), and where present a string ``split`` and a numeric ``beta``. Returns ``rec``; a
    one-line VsaError naming ``source``:``line`` and the field otherwise."""
    if not isinstance(rec, dict):
        raise VsaError("expected a JSON object on each line", source, line)
    missing = [f for f in ("key", "sentid", "tokens", "snippets") if f not in rec]
    if missing:
        raise VsaError(f"not an alignment record: no {', '.join(repr(f) for f in missing)} "
                       "(`vsa align` writes key, sentid, split, tokens, beta, snippets)", source, line)
    if not isinstance(rec["key"], str) or not rec["key"]:
        raise VsaError(f"'key' must be a non-empty string, got {rec['key']!r:.60}", source, line)
    if not _whole(rec["sentid"]):
        raise VsaError(f"'sentid' must be a whole number, got {rec['sentid']!r:.60}", source, line)
    tokens = rec["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise VsaError(f"'tokens' must be a list of strings, got {tokens!r:.60}", source, line)
    if rec.get("split") is not None and not isinstance(rec["split"], str):
        raise VsaError(f"'split' must be a string, got {rec['split']!r:.60}", source, line)
    if rec.get("beta") is not None and not is_number(rec["beta"]):
        raise VsaError(f"'beta' must be a number, got {rec['beta']!r:.60}", source, line)
    check_snippets(rec["snippets"], len(tokens), source, line)
    return rec


def read_part(part: Path, beta: float, warn=None) -> list[dict]:
    """Finished records of an interrupted run (same beta); a torn last line, or any line that is not a whole
    alignment record (:func:`check_alignment_record`), is dropped and its pair redone."""
    from vsa.io import atomic_write, dumps, loads

    if not part.exists():
        return []
    good, bad, other_beta = [], 0, 0
    with open(part, "rb") as fh:
        for line in fh:
            try:
                r = check_alignment_record(loads(line))
            except (ValueError, VsaError):  # orjson.JSONDecodeError is a ValueError
                bad += 1
                continue
            if float(r.get("beta", beta)) != float(beta):
                other_beta += 1
                continue
            good.append(r)
    if bad or other_beta:
        if warn and other_beta:
            warn(f"{part}: {other_beta} record(s) made with another --beta are redone")
        with atomic_write(part) as fh:  # rewrite clean, so appending never follows a torn line
            for r in good:
                fh.write(dumps(r) + b"\n")
    return good


def align_to_file(aligner, store, pairs: list[tuple], out: Path, beta: float, resume: bool = True,
                  warn=None, progress=None, flush_every: int = 200) -> dict:
    """Align every pair into ``out`` (atomically), resumable through ``<out>.part``."""
    out = Path(out)
    part = part_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from vsa.io import output_lock

    with output_lock(out, "vsa align"):  # one writer per output: a second `vsa align -o OUT` is refused
        return _align_to_file(aligner, store, pairs, out, part, beta, resume, warn, progress, flush_every)


def _align_to_file(aligner, store, pairs, out: Path, part: Path, beta, resume, warn, progress, flush_every) -> dict:
    from vsa.io import atomic_write, dumps

    if not resume and part.exists():
        part.unlink()
    old = read_part(part, beta, warn) if resume else []
    done = {(r["key"], r["sentid"]) for r in old}
    task = progress.add_task("align", total=len(pairs)) if progress is not None else None
    step = (lambda: progress.advance(task)) if progress is not None else None
    n_new = 0
    with writing(part), open(part, "ab") as fh:
        for i, r in enumerate(iter_alignments(aligner, store, pairs, beta, done, step)):
            fh.write(dumps(r) + b"\n")
            n_new += 1
            if i % flush_every == 0:
                fh.flush()
    # final file in dataset order, from the part (the part holds every finished record)
    order = {(rec.key, s.sentid): i for i, (rec, s) in enumerate(pairs)}
    records = read_part(part, beta)
    records = [r for r in records if (r["key"], r["sentid"]) in order]
    seen, unique = set(), []
    for r in sorted(records, key=lambda r: order[(r["key"], r["sentid"])]):
        k = (r["key"], r["sentid"])
        if k not in seen:
            seen.add(k)
            unique.append(r)
    with atomic_write(out) as fh:
        for r in unique:
            fh.write(dumps(r) + b"\n")
    part.unlink(missing_ok=True)
    return {"pairs": len(pairs), "resumed": len(done), "aligned": n_new, "written": len(unique), "records": unique}


def align_split(model, features, ds, split: str = "train", out=None, beta: float | None = None, resume: bool = True,
                skip_missing: bool = False, limit: int | None = None, shard: str | None = None, device: str = "auto",
                threads: int = 0, warn=None, progress=None) -> dict:
    """``vsa align``: snippet alignments of every image-sentence pair of ``split`` of ``ds`` (``all``: every
    split), one JSONL record each, by the aligner checkpoint ``model`` (default: the shipped one) on the region
    features file ``features``.

    ``out`` None or ``"-"``: streamed to stdout; a file: written atomically in dataset order, resumable through
    ``<out>.part`` (``resume`` False ignores an earlier part; an interrupt keeps the part and raises
    :class:`vsa.runtime.Interrupted` saying so). ``beta``: the MRF's (default: the aligner's own,
    :func:`aligner_beta`). ``skip_missing``: leave out dataset images without features (default: an error);
    ``limit``: only the first N pairs; ``shard`` ``K/N``: a deterministic 1/N of them. ``progress``: a rich
    Progress to advance. Returns ``{"pairs", "resumed" (None for stdout), "beta", "stats"}``
    (:func:`vsa.alignment.mrf.snippet_stats` of the records written).
    """
    from vsa.alignment.model import load_aligner
    from vsa.features.store import load_features
    from vsa.io import JsonlWriter, is_stdio
    from vsa.alignment.mrf import snippet_stats
    from vsa.runtime import pick_device, set_threads

    set_threads(threads)
    aligner = load_aligner(model, device=pick_device(device))
    beta = aligner_beta(aligner, beta)  # given, else the aligner's own (a val sweep, saved in it), else the default
    store = load_features(features)
    check_extractor(aligner.extractor_meta, store.meta, features, "aligner")
    if split not in ("all", "train+restval") and not ds.split(split):
        raise VsaError(f"split {split!r} has no images in {ds.source}")
    recs = ds.images if split == "all" else ds.split(split)
    keep = {r.key for r in store.check_dataset(recs, skip_missing=skip_missing, warn=warn)}
    pairs = [(r, s) for r, s in pairs_of(ds, split) if r.key in keep]
    if limit is not None:
        pairs = pairs[:limit]
    if shard:
        from vsa.runtime import shard_of

        pairs = shard_of(pairs, shard)
    if out is None or is_stdio(out):
        task = progress.add_task("align", total=len(pairs)) if progress is not None else None
        step = (lambda: progress.advance(task)) if progress is not None else None
        written = []
        with JsonlWriter("-") as w:
            for r in iter_alignments(aligner, store, pairs, beta, on_pair=step):
                w.write(r)
                written.append({"snippets": r["snippets"]})
        return {"pairs": len(pairs), "resumed": None, "beta": beta, "stats": snippet_stats(written)}
    from vsa.runtime import Interrupted

    try:
        res = align_to_file(aligner, store, pairs, Path(out), beta, resume=resume, warn=warn, progress=progress)
    except KeyboardInterrupt:
        part = part_path(Path(out))
        n = sum(1 for _ in open(part, "rb")) if part.exists() else 0
        raise Interrupted(f"interrupted; {n} finished pair(s) kept in {part} ({out} untouched); "
                          "rerun the same command to resume") from None
    return {"pairs": len(pairs), "resumed": res["resumed"], "beta": beta, "stats": snippet_stats(res["records"])}
