"""Seeded filler prose for synthetic tasks: varied English from a small grammar, sized in model
tokens, with planted texts at chosen depths (`document`). Nothing is downloaded, and a compression
policy cannot exploit one repeated sentence."""

from __future__ import annotations

import random
from typing import Any

from ..errors import KVBudgetError

# Each topic: (place name, people, things, places within it, animals-or-sounds clauses).
TOPICS: list[dict[str, list[str]]] = [
    {"name": ["the harbor town"],
     "people": ["the fishermen", "the ferry captain", "the harbor master", "two dock workers",
                "the net maker", "a young sailor"],
     "things": ["the nets", "the cargo crates", "the mooring ropes", "the old rowing boat",
                "the tide tables", "a barrel of salted herring", "the lanterns"],
     "places": ["on the pier", "by the breakwater", "in the boathouse", "along the quay",
                "near the lighthouse"],
     "scenes": ["the gulls circled above the masts", "the tide crept over the mudflats",
                "a foghorn sounded somewhere beyond the point",
                "waves slapped against the wooden pilings"]},
    {"name": ["the orchard"],
     "people": ["the farmers", "the pickers", "the old gardener", "a neighbour's daughter",
                "the beekeeper", "the cider maker"],
     "things": ["the apple baskets", "the wooden ladders", "the pruning shears",
                "the cider press", "the young pear trees", "a cart of windfalls"],
     "places": ["between the rows of trees", "behind the barn", "at the edge of the field",
                "under the walnut tree", "near the stone wall"],
     "scenes": ["bees drifted lazily between the blossoms", "the grass was wet with dew",
                "a late frost silvered the lower branches",
                "the smell of ripe fruit hung in the air"]},
    {"name": ["the library", "the town archive"],
     "people": ["the librarian", "a group of students", "the archivist", "an elderly reader",
                "the bookbinder", "a visiting historian"],
     "things": ["the old maps", "the parish ledgers", "a box of letters", "the card catalogue",
                "the reading lamps", "a stack of travel journals"],
     "places": ["in the reading room", "on the top floor", "behind the main desk",
                "in the cellar stacks", "beside the tall windows"],
     "scenes": ["the only sound was the turning of pages", "dust floated in the slanting light",
                "the radiators ticked as they warmed up",
                "rain tapped against the skylight"]},
    {"name": ["the mountain village"],
     "people": ["the shepherds", "the innkeeper", "a pair of hikers", "the schoolteacher",
                "the village baker", "the mountain guide"],
     "things": ["the woollen blankets", "the firewood", "the trail markers",
                "the chapel bell", "a basket of mushrooms", "the snow shovels"],
     "places": ["on the high pasture", "by the chapel", "at the foot of the pass",
                "in the village square", "along the mule track"],
     "scenes": ["goats wandered across the path", "snow still lay in the shaded gullies",
                "clouds rolled slowly down the valley", "the stream ran loud with meltwater"]},
    {"name": ["the railway station"],
     "people": ["the station master", "the passengers", "a porter", "the ticket clerk",
                "the signal operator", "a family of travellers"],
     "things": ["the timetables", "the luggage trolleys", "the platform clock",
                "a crate of newspapers", "the waiting room stove", "the signal lamps"],
     "places": ["on the far platform", "in the waiting room", "beside the ticket office",
                "under the iron canopy", "near the goods shed"],
     "scenes": ["the night train rumbled in an hour late", "steam drifted along the platform",
                "a whistle blew twice in the distance",
                "the rails hummed before the express came through"]},
    {"name": ["the market square"],
     "people": ["the traders", "the baker", "a cheese seller", "the flower seller",
                "a crowd of shoppers", "the town crier"],
     "things": ["the spice jars", "the copper pots", "baskets of bread", "the striped awnings",
                "the weighing scales", "crates of oranges"],
     "places": ["around the fountain", "under the clock tower", "at the corner stall",
                "near the town hall", "along the narrow lane"],
     "scenes": ["pigeons gathered around the fountain", "the church bells rang for noon",
                "the smell of roasting chestnuts filled the square",
                "a street musician played an old waltz"]},
    {"name": ["the observatory"],
     "people": ["the astronomers", "the night assistant", "a visiting professor",
                "the caretaker", "two graduate students", "the instrument maker"],
     "things": ["the great telescope", "the star charts", "the photographic plates",
                "the logbooks", "the brass eyepieces", "the weather records"],
     "places": ["under the dome", "in the plate room", "on the roof terrace",
                "beside the clock room", "in the small library"],
     "scenes": ["the sky cleared just after midnight", "a comet hung low over the hills",
                "the dome creaked as it turned", "frost formed on the railings"]},
    {"name": ["the river mill"],
     "people": ["the miller", "the boatmen", "the miller's apprentice", "a fisherman",
                "the lock keeper", "the carters"],
     "things": ["the sacks of flour", "the millstones", "the wooden paddles",
                "the barges", "the grain ledger", "the sluice gate"],
     "places": ["by the weir", "on the towpath", "under the old bridge", "inside the mill",
                "at the landing stage"],
     "scenes": ["herons stood motionless in the shallows", "the water wheel turned steadily",
                "reeds bent in the current", "mist lay thick over the water"]},
    {"name": ["the carpenter's workshop"],
     "people": ["the carpenter", "the apprentice", "a customer from the next town",
                "the joiner", "the wood carver", "the carpenter's sister"],
     "things": ["the oak planks", "the chisels", "a half-finished cabinet",
                "the workbench", "the wood shavings", "the glue pots"],
     "places": ["in the back room", "by the open door", "next to the lathe",
                "in the timber yard", "under the skylight"],
     "scenes": ["sawdust glittered in the sunlight", "the stove crackled in the corner",
                "the smell of pine resin filled the room",
                "a radio played quietly on the shelf"]},
    {"name": ["the village school"],
     "people": ["the teacher", "the pupils", "the headmistress", "the caretaker",
                "a few parents", "the music teacher"],
     "things": ["the spelling lists", "the chalkboards", "the school garden",
                "the wooden desks", "the lunch baskets", "the class register"],
     "places": ["in the classroom", "on the playground", "in the assembly hall",
                "by the cloakroom", "behind the school"],
     "scenes": ["the bell rang for the morning break", "children laughed in the yard",
                "the windows rattled in the wind", "chalk dust hung in the air"]},
]

_VERBS = [  # (past, base): people act on things, so any pair stays sensible.
    ("carried", "carry"), ("repaired", "repair"), ("counted", "count"), ("cleaned", "clean"),
    ("checked", "check"), ("sorted", "sort"), ("moved", "move"), ("inspected", "inspect"),
    ("gathered", "gather"), ("arranged", "arrange"), ("studied", "study"),
    ("painted", "paint"), ("wrapped", "wrap"), ("measured", "measure"), ("polished", "polish"),
    ("described", "describe"), ("stacked", "stack"), ("examined", "examine"),
    ("packed", "pack"), ("mended", "mend"),
]
_TIMES = ["Early that morning", "Later in the afternoon", "By the end of the week",
          "On the first day of spring", "Just before dusk", "Some years earlier",
          "During the long winter", "That evening", "The following Sunday",
          "In the middle of the harvest", "Shortly after breakfast", "Towards midnight"]
_MANNERS = ["slowly", "carefully", "without a word", "with great patience", "in silence",
            "as quickly as they could", "for the second time", "with some reluctance",
            "more cheerfully than usual", "by lantern light"]
_WEATHER = ["the rain had not stopped for three days", "the wind turned cold",
            "the fog rolled in from the hills", "the sun came out after lunch",
            "a storm was expected before nightfall", "the first snow had fallen",
            "the air was unusually warm", "the roads were flooded"]
_REMARKS = ["Nobody could say exactly why.", "Some thought it a waste of time, but others "
            "disagreed.", "It was not the first time this had happened.",
            "Everyone agreed that it had been a long day.",
            "Few people outside the town ever heard about it.",
            "The story was retold for many years afterwards.",
            "It seemed a small thing then.", "Nobody complained, at least not aloud.",
            "Most of the neighbours had seen it before."]
_BUTS = ["but nobody could say exactly why", "but it was already too late",
         "but the work had to wait until morning", "and it was finished before noon",
         "though nobody expected much to come of it", "and then went home early",
         "but the request was soon forgotten"]
_SHORT = ["Nobody minded.", "It rained.", "The day passed quietly.", "Then it was dark.",
          "Nobody said much.", "That was all.", "It was late.", "Nothing else happened that day.",
          "The work went on."]  # tail-enders: let a document land close to its target length
_FEELINGS = ["pleased", "tired", "surprised", "worried", "relieved", "curious", "proud"]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence(rng: random.Random, t: dict[str, list[str]]) -> str:
    """One past-tense sentence about topic t, in one of several shapes."""
    c = rng.choice
    who, who2 = rng.sample(t["people"], 2)
    what, what2 = rng.sample(t["things"], 2)
    (v, vb), (v2, _) = rng.sample(_VERBS, 2)
    where, name = c(t["places"]), c(t["name"])
    shape = rng.randrange(10)
    if shape == 0:
        return f"{c(_TIMES)}, {who} {v} {what} {where}."
    if shape == 1:
        return f"{_cap(who)} {v} {what} {c(_MANNERS)}, and {who2} {v2} {what2}."
    if shape == 2:
        return f"Because {c(_WEATHER)}, {who} {v} {what} {where}."
    if shape == 3:
        return f"{_cap(who)}, who had worked in {name} for years, {v} {what} {c(_MANNERS)}."
    if shape == 4:
        return f"While {c(t['scenes'])}, {who} {v} {what}."
    if shape == 5:
        return f"{_cap(c(t['scenes']))}, and {who} felt {c(_FEELINGS)}."
    if shape == 6:
        return f"It was said that {who} would {vb} {what} whenever {c(_WEATHER)}."
    if shape == 7:
        return f"{_cap(who)} asked {who2} to {vb} {what} {where}, {c(_BUTS)}."
    if shape == 8:
        return f"{c(_TIMES)}, {c(t['scenes'])} {where}."
    return f"{_cap(who)} {v} {what} {where}. {c(_REMARKS)}"


class _Prose:
    """An endless, seeded stream of filler paragraphs: each stays on one topic a while."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.topic = rng.choice(TOPICS)
        self.left = rng.randint(3, 6)

    def next(self) -> tuple[str, bool]:
        """The next sentence and whether it starts a new paragraph."""
        new_para = self.left == 0
        if new_para:
            self.topic = self.rng.choice([t for t in TOPICS if t is not self.topic])
            self.left = self.rng.randint(3, 6)
        self.left -= 1
        return sentence(self.rng, self.topic), new_para

    def alternatives(self, k: int, topic: dict, new_para: bool) -> list[tuple[str, bool]]:
        """k candidate sentences on `topic`, short ones included, to fit a length exactly."""
        return [(sentence(self.rng, topic), new_para) for _ in range(k)] + \
            [(x, new_para) for x in _SHORT]


def filler(rng: random.Random, sentences: int) -> str:
    """`sentences` sentences of filler prose in paragraphs (for tests and previews)."""
    prose = _Prose(rng)
    return _join([prose.next() for _ in range(sentences)])


def _join(pieces: list[tuple[str, bool]]) -> str:
    out: list[str] = []
    for i, (text, new_para) in enumerate(pieces):
        if i:
            out.append("\n\n" if new_para else " ")
        out.append(text)
    return "".join(out)


def ntok(tok: Any, text: str) -> int:
    """Tokens of ``text`` under ``tok``, without special tokens."""
    return len(tok(text, add_special_tokens=False)["input_ids"])


def document(tok: Any, rng: random.Random, length: int,
             inserts: list[tuple[float, str, bool]]) -> str:
    """Filler prose of `length` tokens (within 5%) with `inserts` placed at given depths.

    inserts: (depth in [0, 1], text, as_paragraph); the text goes at the sentence boundary
    nearest that fraction of the document, as its own paragraph when as_paragraph is set.
    Length is counted by `tok` on the returned text, without special tokens.
    """
    prose = _Prose(rng)
    # What a paragraph break costs over a space (two newline tokens for SmolLM2's BPE).
    brk = ntok(tok, "x.\n\nThe") - ntok(tok, "x. The")

    def cost(text: str, new_para: bool) -> int:
        return ntok(tok, " " + text) + (brk if new_para else 0)

    planted = sum(cost(text, para) for _, text, para in inserts)
    if planted > 0.9 * length:
        raise KVBudgetError(f"length {length} is too short: the planted facts alone take "
                            f"{planted} tokens; ask for at least {int(planted / 0.9) + 1}")
    budget = length - planted
    sents: list[tuple[str, bool, int]] = []
    topics: list[dict] = []
    total = 0
    while total < budget:
        text, new_para = prose.next()
        c = cost(text, new_para)
        if total + c > budget:
            # Prefer a sentence that fits the remaining gap over overshooting by a whole one.
            gap = budget - total
            text, new_para = min(prose.alternatives(40, prose.topic, new_para),
                                 key=lambda x: abs(cost(*x) - gap))
            c = cost(text, new_para)
            if abs(gap - c) >= gap:
                break
        sents.append((text, new_para, c))
        topics.append(prose.topic)
        total += c
    doc = _assemble(sents, inserts)
    if sents and abs(ntok(tok, doc) - length) > 0.01 * length:
        # Token counts are not exactly additive across joins: swap the last sentence for the
        # candidate (or none) that lands nearest the target, measured on the whole text.
        alts = prose.alternatives(40, topics[-1], sents[-1][1])
        options = [sents[:-1]] + [sents[:-1] + [(t, p, 0)] for t, p in alts]
        doc = min((_assemble(o, inserts) for o in options),
                  key=lambda d: abs(ntok(tok, d) - length))
    return doc


def spread(rng: random.Random, j: int, k: int) -> float:
    """Depth of the j-th of k planted items: one per equal slice of (0.05, 0.95), jittered
    inside its slice, so that items are spread out and keep their order."""
    return 0.05 + 0.9 * (j + rng.uniform(0.2, 0.8)) / k


def _assemble(sents: list[tuple[str, bool, int]],
              inserts: list[tuple[float, str, bool]]) -> str:
    """Join (text, new_para, tokens) sentences, inserts at their depth by token count."""
    total = sum(c for *_, c in sents) or 1
    bounds = [0]
    for *_, c in sents:
        bounds.append(bounds[-1] + c)
    slots: dict[int, list[tuple[str, bool]]] = {}
    for depth, text, para in sorted(inserts, key=lambda x: x[0]):
        at = min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * total))
        slots.setdefault(at, []).append((text, para))
    pieces: list[tuple[str, bool]] = []
    for i in range(len(sents) + 1):
        after_para = False
        for text, para in slots.get(i, []):
            pieces.append((text, para or after_para))
            after_para = para
        if i < len(sents):
            # Text after a paragraph insert starts a fresh paragraph too.
            pieces.append((sents[i][0], sents[i][1] or after_para))
    return _join(pieces)
