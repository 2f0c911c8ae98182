"""Analysis of alignments and region captions for the benchmarks and docs (not part of the vsa library): how often
a snippet or a region caption names what the detector found in its box, the grounding figure of an aligner, and
the snippet statistics of several MRF betas.

benchmarks/grounding.py reports :func:`noun_grounding` and :func:`label_agreement`, benchmarks/region_agreement.py
:func:`region_agreement`; :func:`beta_sweep` is how an aligner's MRF beta is chosen on val
(docs/alignment-snippets.md). The benchmark scripts import this file as ``analysis`` (their folder is on
``sys.path``), the tests as ``benchmarks.analysis``.
"""

from __future__ import annotations

from typing import Iterable

# caption words that name a COCO detector class (Flickr8K's frequent ones); used to check that an object
# box's snippet talks about what the detector found there
LABEL_WORDS = {
    "person": {"man", "men", "woman", "women", "boy", "boys", "girl", "girls", "child", "children", "kid", "kids",
               "person", "people", "player", "players", "baby", "lady", "guy", "crowd", "biker", "rider", "skier",
               "surfer", "climber", "snowboarder", "skateboarder", "dancer", "toddler", "adult", "he", "she", "they",
               "swimmer", "runner", "cyclist", "team", "couple", "group", "worker", "teenager", "teen", "someone"},
    "dog": {"dog", "dogs", "puppy", "puppies", "poodle", "terrier", "collie", "retriever", "shepherd", "lab", "labrador",
            "greyhound", "dachshund", "husky", "pup", "beagle", "spaniel", "bulldog", "pitbull"},
    "cat": {"cat", "cats", "kitten"}, "horse": {"horse", "horses", "pony"}, "sheep": {"sheep", "lamb"},
    "cow": {"cow", "cows", "cattle", "bull", "calf"}, "bird": {"bird", "birds", "duck", "ducks", "seagull", "pigeon", "pigeons"},
    "bicycle": {"bike", "bikes", "bicycle", "bicycles", "cyclist", "biker"},
    "motorcycle": {"motorcycle", "motorbike", "dirt", "motocross", "motorcyclist"},
    "car": {"car", "cars", "truck", "vehicle", "jeep"}, "truck": {"truck", "trucks"}, "bus": {"bus"},
    "boat": {"boat", "boats", "canoe", "kayak", "raft"}, "sports ball": {"ball", "soccer", "football", "basketball", "volleyball"},
    "frisbee": {"frisbee"}, "skateboard": {"skateboard", "skateboarder", "skateboarding"},
    "surfboard": {"surfboard", "surfer", "surfing", "board"}, "skis": {"ski", "skis", "skier", "skiing"},
    "snowboard": {"snowboard", "snowboarder", "snowboarding"}, "kite": {"kite"}, "umbrella": {"umbrella"},
    "bench": {"bench"}, "chair": {"chair", "chairs"}, "backpack": {"backpack"}, "handbag": {"bag", "purse", "handbag"},
    "bottle": {"bottle"}, "cup": {"cup", "mug"}, "tennis racket": {"racket", "racquet", "tennis"},
    "baseball bat": {"bat", "baseball"}, "baseball glove": {"glove", "mitt", "baseball"}, "teddy bear": {"teddy", "bear"},
}


PHRASE_MAX = 6  # a region description is a short phrase ("a black dog jumps"); longer snippets are sentences


def label_agreement(records) -> dict:
    """How often an object-box snippet names the detector's class of its box (a proxy for correct grounding).

    Counted over snippets on object boxes whose label is in :data:`LABEL_WORDS`: ``agree`` is the share
    whose text holds one of the label's words.  ``good_phrases_per_sentence``: object snippets of 2 to
    :data:`PHRASE_MAX` words naming their box's class, per sentence (usable region-caption training pairs),
    ``phrase_precision`` the share of such phrase-length object snippets that name their class.  ``name_hits`` counts, over all snippets holding such a word,
    the share grounded on a box of that class (the words the region generator should learn from boxes).
    """
    on_obj = agree = named = named_hit = phrases = good = n_sent = 0
    for r in records:
        n_sent += 1
        for s in r["snippets"]:
            words = set(s["text"].split())
            lab = s.get("label", "")
            if s["region"] != 0 and lab in LABEL_WORDS:
                on_obj += 1
                hit = bool(words & LABEL_WORDS[lab])
                agree += hit
                if 2 <= s["end"] - s["start"] <= PHRASE_MAX:
                    phrases += 1
                    good += hit
            for L, ws in LABEL_WORDS.items():
                if words & ws and L in ("person", "dog"):
                    named += 1
                    named_hit += lab == L
                    break
    return {"object_snippets_with_known_label": on_obj, "agree": agree / max(on_obj, 1),
            "good_phrases_per_sentence": good / max(n_sent, 1), "phrase_precision": good / max(phrases, 1),
            "person_dog_snippets": named, "person_dog_on_matching_box": named_hit / max(named, 1)}


def noun_grounding(records, labels_of) -> dict:
    """The grounding figure: of the words that name a COCO class the detector knows (:data:`LABEL_WORDS`:
    "dog", "man", "bicycle", ...) in sentences of images where the detector found a box of that class, the
    share whose snippet lies on a box of that class. ``labels_of(key)`` gives an image's region labels
    (region 0 is the whole image). Returns ``{"words", "grounded", "share", "per_class": {class: [hits, n]}}``."""
    word_class = {}
    for cls, ws in LABEL_WORDS.items():
        for w in ws:
            word_class.setdefault(w, cls)
    n = hits = 0
    per: dict[str, list[int]] = {}
    for r in records:
        present = set(labels_of(r["key"])[1:])
        region_of = {}
        for sn in r["snippets"]:
            for t in range(sn["start"], sn["end"]):
                region_of[t] = sn
        for t, w in enumerate(r["tokens"]):
            cls = word_class.get(w)
            if cls is None or cls not in present or t not in region_of:
                continue
            sn = region_of[t]
            hit = sn["region"] != 0 and sn.get("label") == cls
            n += 1
            hits += hit
            c = per.setdefault(cls, [0, 0])
            c[0] += hit
            c[1] += 1
    return {"words": n, "grounded": hits, "share": hits / max(n, 1), "per_class": per}


def beta_sweep(aligner, store, pairs: list[tuple], betas: Iterable[float], progress=None) -> dict:
    """Snippet statistics (:func:`vsa.alignment.mrf.snippet_stats`, :func:`label_agreement`) of ``pairs`` (``(ImageRecord,
    Sentence)``, :func:`vsa.alignment.snippets.pairs_of`) for several betas: how the MRF's beta is chosen on val.

    The word-region scores are computed once per pair and decoded with every beta.
    """
    from vsa.alignment.mrf import alignment_record, snippet_stats
    from vsa.alignment.snippets import word_region_scores

    betas = list(betas)
    recs: dict[float, list] = {b: [] for b in betas}
    cur_key, cache = None, {}
    task = progress.add_task("sweep", total=len(pairs)) if progress is not None else None
    for rec, sent in pairs:
        if rec.key != cur_key:
            cur_key, cache = rec.key, {}
            feats, boxes, labels = store[rec.key], store.boxes(rec.key), store.labels(rec.key)
        U = word_region_scores(aligner, feats, sent.tokens, cache)
        for b in betas:
            recs[b].append(alignment_record(rec.key, sent.sentid, rec.split, sent.tokens, U, b, boxes, labels))
        if progress is not None:
            progress.advance(task)
    return {b: {**snippet_stats(recs[b]), **label_agreement(recs[b])} for b in betas}


def region_agreement(records) -> dict:
    """How often a region caption names what the detector found in its box.

    ``records``: caption records with ``regions`` (``vsa caption --regions --json``). Counted over the regions
    whose detector label has caption words in :data:`LABEL_WORDS` (person: man, woman, boy, ...;
    dog: dog, puppy, ...): ``agree`` is the share whose caption holds one of them; ``by_label`` per class.
    """
    from vsa.data import tokenize

    def hits():
        for rec in records:
            for r in rec.get("regions", []):
                lab = r.get("label", "")
                if lab in LABEL_WORDS:
                    yield lab, bool(set(tokenize(r.get("caption", ""))) & LABEL_WORDS[lab])

    return _tally(hits(), "regions", "agree")


def caption_grounding(records) -> dict:
    """Where a generated caption names a class the detector found in the photo, does its grounded snippet land on
    a box of that class?

    ``records``: ``vsa caption --ground --regions --json`` records (``snippets`` with their box ``label``,
    ``regions`` the photo's top detections). Counted over the class words (:data:`vsa.labels.CLASS_WORDS`) of
    each snippet whose class is among the photo's detections: ``on_class`` is the share whose snippet's box has
    that label; ``by_label`` per class."""
    from vsa.data import tokenize
    from vsa.labels import CLASS_WORDS

    word_class = {w: c for c, ws in CLASS_WORDS.items() for w in ws}

    def hits():
        for rec in records:
            found = {r.get("label") for r in rec.get("regions", [])}
            for s in rec.get("snippets", []):
                for w in tokenize(s.get("text", "")):
                    c = word_class.get(w)
                    if c is not None and c in found:
                        yield c, s.get("label") == c

    return _tally(hits(), "words", "on_class")


def _tally(hits, count: str, share: str) -> dict:
    """``(label, ok)`` pairs -> ``{count: n, share: fraction ok, "by_label": {label: {count, share}}}``, labels by
    count, most first."""
    n = hit = 0
    by: dict = {}
    for lab, ok in hits:
        n += 1
        hit += ok
        b = by.setdefault(lab, [0, 0])
        b[0] += 1
        b[1] += ok
    return {count: n, share: round(hit / max(n, 1), 4),
            "by_label": {k: {count: v[0], share: round(v[1] / v[0], 4)}
                         for k, v in sorted(by.items(), key=lambda kv: -kv[1][0])}}
