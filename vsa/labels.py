"""Detector labels as caption words: the words people use for each COCO class, and the constraint sets that
constrained decoding (:func:`vsa.generator.decoding.constrained_beam_search`) builds from a photo's detections.

``CLASS_WORDS[label]`` is a disjunction of single words, singular and plural and the usual synonyms ("person":
man, woman, boy, girl, child, people, ...); a caption names the class when it contains one of them. The same
table decides what a constrained caption must contain and what the object-mention benchmark counts as a mention
(benchmarks/mentions.py), as the synonym lists of DCC / NOC and nocaps do.
"""

from __future__ import annotations

CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "man", "men", "woman", "women", "boy", "boys", "girl", "girls", "child",
               "children", "kid", "kids", "guy", "guys", "lady", "ladies", "baby", "toddler", "player", "players",
               "persons", "adult", "adults", "teenager", "teenagers"),
    "bicycle": ("bicycle", "bicycles", "bike", "bikes", "cyclist", "cyclists", "biker", "bikers"),
    "car": ("car", "cars", "vehicle", "vehicles", "jeep", "taxi", "suv"),
    "motorcycle": ("motorcycle", "motorcycles", "motorbike", "motorbikes", "motocross", "dirtbike", "scooter"),
    "airplane": ("airplane", "airplanes", "plane", "planes", "jet", "jets", "aircraft"),
    "bus": ("bus", "buses"),
    "train": ("train", "trains", "locomotive"),
    "truck": ("truck", "trucks"),
    "boat": ("boat", "boats", "canoe", "canoes", "kayak", "kayaks", "sailboat", "ship", "raft", "rowboat"),
    "traffic light": ("stoplight", "streetlight"),
    "fire hydrant": ("hydrant", "hydrants"),
    "stop sign": ("sign",),
    "parking meter": ("meter",),
    "bench": ("bench", "benches"),
    "bird": ("bird", "birds", "seagull", "seagulls", "gull", "pigeon", "pigeons", "duck", "ducks", "goose", "geese"),
    "cat": ("cat", "cats", "kitten", "kittens", "kitty"),
    "dog": ("dog", "dogs", "puppy", "puppies", "pup"),
    "horse": ("horse", "horses", "pony", "ponies"),
    "sheep": ("sheep", "lamb", "lambs"),
    "cow": ("cow", "cows", "cattle", "bull", "bulls", "calf"),
    "elephant": ("elephant", "elephants"),
    "bear": ("bear", "bears"),
    "zebra": ("zebra", "zebras"),
    "giraffe": ("giraffe", "giraffes"),
    "backpack": ("backpack", "backpacks"),
    "umbrella": ("umbrella", "umbrellas", "parasol"),
    "handbag": ("handbag", "purse", "purses", "handbags"),
    "tie": ("tie", "ties", "necktie"),
    "suitcase": ("suitcase", "suitcases", "luggage"),
    "frisbee": ("frisbee", "frisbees"),
    "skis": ("skis", "ski", "skier", "skiers", "skiing"),
    "snowboard": ("snowboard", "snowboards", "snowboarder", "snowboarders", "snowboarding"),
    "sports ball": ("ball", "balls", "football", "soccer", "basketball", "volleyball", "baseball", "softball"),
    "kite": ("kite", "kites"),
    "baseball bat": ("bat", "bats"),
    "baseball glove": ("glove", "gloves", "mitt"),
    "skateboard": ("skateboard", "skateboards", "skateboarder", "skateboarders", "skateboarding", "skater"),
    "surfboard": ("surfboard", "surfboards", "surfer", "surfers", "surfing"),
    "tennis racket": ("racket", "rackets", "racquet", "racquets", "tennis"),
    "bottle": ("bottle", "bottles"),
    "wine glass": ("wineglass", "wineglasses"),  # not "glasses": in captions those are worn
    "cup": ("cup", "cups", "mug", "mugs", "coffee"),
    "fork": ("fork", "forks"),
    "knife": ("knife", "knives"),
    "spoon": ("spoon", "spoons"),
    "bowl": ("bowl", "bowls"),
    "banana": ("banana", "bananas"),
    "apple": ("apple", "apples"),
    "sandwich": ("sandwich", "sandwiches"),
    "orange": ("oranges",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot", "carrots"),
    "hot dog": ("hotdog", "hotdogs"),
    "pizza": ("pizza", "pizzas"),
    "donut": ("donut", "donuts", "doughnut", "doughnuts"),
    "cake": ("cake", "cakes", "cupcake"),
    "chair": ("chair", "chairs"),
    "couch": ("couch", "couches", "sofa", "sofas"),
    "potted plant": ("plant", "plants"),
    "bed": ("bed", "beds"),
    "dining table": ("table", "tables"),
    "toilet": ("toilet", "toilets"),
    "tv": ("tv", "television", "televisions"),
    "laptop": ("laptop", "laptops", "computer", "computers"),
    "mouse": ("mouse",),
    "remote": ("remote", "remotes"),
    "keyboard": ("keyboard", "keyboards"),
    "cell phone": ("phone", "phones", "cellphone", "cellphones"),
    "microwave": ("microwave", "microwaves"),
    "oven": ("oven", "ovens", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink", "sinks"),
    "refrigerator": ("refrigerator", "fridge"),
    "book": ("book", "books"),
    "clock": ("clock", "clocks"),
    "vase": ("vase", "vases"),
    "scissors": ("scissors",),
    "teddy bear": ("teddy",),
    "hair drier": ("hairdryer", "dryer"),
    "toothbrush": ("toothbrush", "toothbrushes"),
}

COCO_CLASSES: tuple[str, ...] = tuple(CLASS_WORDS)  # the 80 COCO classes in the detector's order


def names_class(tokens, label: str) -> bool:
    """Does a tokenised sentence name the class ``label``?"""
    words = CLASS_WORDS.get(label, ())
    return any(t in words for t in tokens)


def constraint_sets(detections: list[dict], stoi: dict[str, int], min_score: float = 0.5, max_sets: int = 2,
                    skip: tuple[str, ...] = ()) -> tuple[list[frozenset[int]], list[str]]:
    """The constraint sets of one photo: for its most confident detected classes (score >= ``min_score``, at most
    ``max_sets``, best first, none of ``skip``), the ids of that class's words that the vocabulary ``stoi`` has.
    A class none of whose words the vocabulary has gives no constraint. Returns ``(sets, labels)``."""
    best: dict[str, float] = {}
    for d in detections:
        label, score = d.get("label"), float(d.get("score", 0.0))
        if label in CLASS_WORDS and label not in skip and score >= min_score and score > best.get(label, -1.0):
            best[label] = score
    sets, labels = [], []
    for label in sorted(best, key=lambda k: -best[k]):
        ids = frozenset(stoi[w] for w in CLASS_WORDS[label] if w in stoi)
        if ids:
            sets.append(ids)
            labels.append(label)
        if len(sets) >= max_sets:
            break
    return sets, labels


# The words a label-reading generator writes for a box of each class (singular, plural), copied from the box even
# when the training captions never used them: the class name's head word and its plural, or the word people use.
_COPY_OVERRIDES = {
    "person": ("person", "people"), "skis": ("ski", "skis"), "sports ball": ("ball", "balls"),
    "traffic light": ("light", "lights"), "dining table": ("table", "tables"), "potted plant": ("plant", "plants"),
    "wine glass": ("glass", "glasses"), "hot dog": ("hotdog", "hotdogs"), "cell phone": ("phone", "phones"),
    "teddy bear": ("teddy", "teddies"), "mouse": ("mouse", "mice"), "knife": ("knife", "knives"),
    "sheep": ("sheep", "sheep"), "broccoli": ("broccoli", "broccoli"), "scissors": ("scissors", "scissors"),
    "hair drier": ("dryer", "dryers"), "tv": ("tv", "tvs"), "fire hydrant": ("hydrant", "hydrants"),
    "parking meter": ("meter", "meters"), "stop sign": ("sign", "signs"), "tennis racket": ("racket", "rackets"),
    "baseball bat": ("bat", "bats"), "baseball glove": ("glove", "gloves"),
}


def _plural(word: str) -> str:
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def copy_words(label: str) -> tuple[str, str]:
    """(singular, plural) a caption writes for a box labelled ``label`` (a COCO class or any class name)."""
    if label in _COPY_OVERRIDES:
        return _COPY_OVERRIDES[label]
    head = label.split()[-1]
    return head, _plural(head)
