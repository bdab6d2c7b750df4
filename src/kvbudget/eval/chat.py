"""The `chat` generator: a group chat of 3-4 named friends over dated sessions, for measuring
what a compressed cache keeps of a conversation it did not see the questions for.

Each message is "Name: text" with the roles alternating user/assistant (a valid chat for any
template); each session's first message starts "Session k — 14 March 2024". Every session has a
topic that drifts to a neighbouring one or comes back to an earlier one, and the planted facts
bring their own topics back. Filler messages vary from a one-word reaction to a long anecdote,
and sessions get unequal shares of them, so the gaps between facts vary.

Question kinds (``category``), each naming the speaker it asks about:
- ``single``: a fact stated once ("Mara: My dog is called Biscuit."); another speaker may state
  the same kind of fact with another value (a distractor);
- ``updated``: a value stated, then changed in a later session; the gold answer is the latest
  value, the earlier one stays in the context ("I live in Lyon." ... "I live in Oslo now.");
- ``multi-session``: two statements in two sessions combine: a bridge ("My sister is called
  Ines." ... "Ines started working as a pilot." -> "What job does Mara's sister have?") or a pair
  of values both asked for (``string_match_all``).

The task's ``meta`` names the speakers and, per question in order, its category, the
(session, message index) of every statement it rests on, and an update's earlier value.
"""

from __future__ import annotations

import datetime
import random
from typing import Any

from ..errors import KVBudgetError
from .conversation import chat_tokens
from .prose import TOPICS, ntok, sentence
from .taskfile import Question, Task

_SPEAKERS = ["Mara", "Tobias", "Ines", "Rafael", "Selma", "Viktor", "Nora", "Elio", "Greta",
             "Hugo", "Lena", "Oskar", "Priya", "Kofi", "Yuki", "Dario"]
_PEOPLE = ["Anouk", "Bram", "Carmen", "Dmitri", "Esther", "Felix", "Gwen", "Henrik", "Ilse",
           "Jonas", "Katya", "Lucas", "Maren", "Nils", "Odile", "Pavel"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]

_POOLS = {
    "pet_name": ["Biscuit", "Pepper", "Juniper", "Clover", "Nutmeg", "Ziggy", "Waffles",
                 "Pickles", "Tofu", "Mochi", "Pretzel", "Noodle"],
    "pet": ["dog", "cat", "parrot", "rabbit", "tortoise", "hamster", "ferret", "goldfish"],
    "dish": ["lentil soup", "mushroom risotto", "fish tacos", "apple crumble", "pad thai",
             "goulash", "falafel", "paella", "ramen", "moussaka"],
    "instrument": ["cello", "banjo", "trumpet", "harp", "accordion", "violin", "ukulele",
                   "saxophone"],
    "plant": ["tulips", "sunflowers", "lavender", "tomatoes", "peonies", "strawberries",
              "dahlias", "courgettes"],
    "sport": ["badminton", "volleyball", "fencing", "rowing", "squash", "table tennis",
              "climbing", "judo"],
    "allergy": ["peanuts", "shellfish", "kiwi", "sesame", "celery", "mustard"],
    "city": ["Lyon", "Oslo", "Porto", "Krakow", "Dublin", "Seville", "Tallinn", "Bergen",
             "Ghent", "Bologna", "Leeds", "Graz", "Utrecht", "Malmo"],
    "company": ["Northwind", "Bluefield", "Copperleaf", "Stonebridge", "Brightwater",
                "Ironwood", "Silverline", "Greenhill", "Redcliff", "Westbrook"],
    "car": ["Volvo", "Fiat", "Skoda", "Toyota", "Renault", "Kia", "Mazda", "Peugeot",
            "Subaru", "Citroen"],
    "job": ["pilot", "dentist", "architect", "librarian", "firefighter", "chemist",
            "journalist", "plumber", "pharmacist", "surveyor"],
    "place": ["Kyoto", "Lisbon", "Marrakesh", "Reykjavik", "Vienna", "Cusco", "Hanoi",
              "Quebec", "Zanzibar", "Tbilisi", "Havana", "Oaxaca"],
    "relative": ["sister", "brother", "cousin", "best friend", "neighbour", "manager"],
}

# Kinds of fact: topic, statement templates ({v}: value; {o}: the old value of an update),
# question template ({p}: the speaker), the pool of values.
_SINGLE = {
    "pet_name": ("pets", ["By the way, my {pet} is called {v}.", "Our {pet} {v} chewed my shoes again.",
                          "My {pet}, {v}, finally learned to sit."], "What is {p}'s {pet} called?"),
    "dish": ("food", ["My favourite thing to cook is {v}.", "Nothing beats my {v}, honestly, it is my favourite dish."],
             "What is {p}'s favourite dish to cook?"),
    "instrument": ("music", ["I have started {v} lessons on Thursdays.", "I finally bought a {v} and started lessons."],
                   "Which instrument is {p} learning?"),
    "plant": ("garden", ["I planted {v} along the fence this year.", "The {v} I planted are doing really well."],
              "What did {p} plant in the garden?"),
    "sport": ("sport", ["I joined a {v} club last month.", "I play {v} twice a week now, it keeps me sane."],
              "Which sport does {p} play at a club?"),
    "allergy": ("food", ["Just so you know, I am allergic to {v}.", "Remember I can't eat {v}, I'm allergic."],
                "What is {p} allergic to?"),
}
_UPDATED = {
    "city": ("home", "city", ["I live in {v} at the moment.", "Life in {v} is good, the flat is small but nice."],
             ["Big news: we moved from {o} to {v}.", "I live in {v} now, the move went fine."],
             "Which city does {p} live in now?"),
    "company": ("work", "company", ["I work at {v}, in the planning team.", "Work at {v} is busy this month."],
                ["I left {o} and started at {v} this week.", "My new job is at {v}, first week done."],
                "Where does {p} work now?"),
    "car": ("travel", "car", ["I drive an old {v}, it still runs.", "My {v} needs new tyres again."],
            ["I sold the {o} and bought a {v}.", "I drive a {v} now, much better on long trips."],
            "What car does {p} drive now?"),
}
_BRIDGE = {  # a relative named in one session, something about them in another
    "job": ("work", "job", "{x} just started working as a {v}.", "What job does {p}'s {rel} have?"),
    "moved": ("home", "city", "{x} has moved to {v}, can you believe it?", "Which city did {p}'s {rel} move to?"),
    "holiday": ("travel", "place", "{x} is off to {v} on holiday next week.", "Where is {p}'s {rel} going on holiday?"),
}
_NAMING = ["My {rel} is called {x}.", "You haven't met my {rel}, {x}, have you?",
           "I had lunch with my {rel} {x} yesterday."]
_PAIRS = {  # two values from two sessions, both asked for
    "trips": ("travel", "place", "I spent a long weekend in {v}.", "I just got back from {v}, what a trip.",
              "Which two places did {p} travel to?"),
    "pets": ("pets", "pet", "We adopted a {v} from the shelter.", "We have a {v} now as well, the house is a zoo.",
             "Which two animals did {p} adopt?"),
}

# Small talk: topic -> (lines, neighbouring topics the talk drifts to).
_TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "home": (["The heating in our building broke again.", "Does anyone know a good electrician?",
              "We finally put up the shelves in the hallway.", "The neighbours are renovating, it is so loud.",
              "I am thinking of painting the kitchen a lighter colour."], ["garden", "family", "work"]),
    "work": (["The quarterly meeting ran two hours over.", "My manager wants a new report every Friday.",
              "I am trying to stop answering emails after eight.", "We got new laptops at the office.",
              "Anyone else dreading Monday already?"], ["home", "travel", "books"]),
    "food": (["I tried baking bread, but it came out flat.", "We found a small market with fresh herbs.",
              "Who wants to come for dinner on Saturday?", "My spice drawer is a complete mess.",
              "That new bakery on the corner is worth a visit."], ["garden", "family", "travel"]),
    "pets": (["The vet said we should change the food brand.", "It sleeps on the sofa and ignores the new basket.",
              "It keeps waking me up at six in the morning.", "Do pet cameras actually help?",
              "We walked for an hour and it still wanted more."], ["home", "family", "sport"]),
    "travel": (["I have been looking at train routes for the summer.", "The airport queues last time were awful.",
                "I always forget to pack an adapter.", "Night trains or day trips, what do you prefer?",
                "I would love to see the northern lights one day."], ["food", "books", "work"]),
    "music": (["Did anyone go to the open air concert?", "I joined a small choir on Tuesdays.",
               "My playlist for running is getting stale.", "The jazz bar downtown has a new band.",
               "Practising scales is so boring but it helps."], ["books", "sport", "family"]),
    "garden": (["The slugs ate half of my lettuce.", "We need rain, the lawn is completely brown.",
                "I built a compost bin out of old pallets.", "Does anyone want seedlings? I have too many.",
                "The apple tree finally has blossoms."], ["food", "home", "pets"]),
    "sport": (["My knees are not happy after the weekend.", "Anyone up for a run on Sunday morning?",
               "The new gym schedule is a mess.", "I watched the final last night, what a match.",
               "Stretching after training really makes a difference."], ["music", "pets", "travel"]),
    "family": (["My parents are visiting next month.", "We had a long call with my grandmother.",
                "The family group chat is very busy this week.", "We are planning a picnic for everyone.",
                "The kids have a school play on Friday."], ["home", "food", "music"]),
    "books": (["I have been reading a mystery novel every week.", "Our book club cannot agree on anything.",
               "Is the library open on holidays?", "I started a thick history book, wish me luck.",
               "Audiobooks make the commute much shorter."], ["music", "travel", "work"]),
}
_REACTIONS = ["Ha, same here.", "Oh no!", "Really?", "That sounds lovely.", "Good luck with that!",
              "Totally.", "Wow.", "Fair enough.", "I know what you mean.", "Haha, typical.",
              "Same.", "Sounds great!", "Oh nice!", "Good to know.", "Hang in there."]
_STORY = ["That reminds me of a story I read:", "Funny, my uncle always tells this one:",
          "Random, but I read this in a novel last night:", "Sorry, long message incoming:"]


def _date(d: datetime.date) -> str:
    return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"


class _Facts:
    """The facts of one chat: statements placed in sessions and the questions asking them back."""

    def __init__(self, rng: random.Random, speakers: list[str], sessions: int) -> None:
        self.rng, self.speakers, self.sessions = rng, speakers, sessions
        self.used: set[str] = set()
        self.statements: list[tuple[int, str, str, str, int | None]] = []  # session, speaker, text, topic, fact
        self.facts: list[dict] = []  # per question: the Question, the earlier value of an update

    def value(self, pool: str) -> str:
        v = self.rng.choice([x for x in _POOLS[pool] if x not in self.used])
        self.used.add(v)
        return v

    def say(self, session: int, speaker: str, text: str, topic: str, asked: bool = True) -> None:
        """A statement of the fact asked next (``asked``) or of a distractor."""
        self.statements.append((session, speaker, text, topic, len(self.facts) if asked else None))

    def ask(self, text: str, answers: list[str], category: str, metric: str = "contains", old: str | None = None
            ) -> None:
        self.facts.append({"question": Question(question=text, answers=answers, metric=metric, category=category),
                           "old": old})

    def single(self, kind: str) -> None:
        rng = self.rng
        topic, templates, question = _SINGLE[kind]
        pet = self.value("pet") if kind == "pet_name" else ""
        owner = rng.choice(self.speakers)
        v = self.value(kind)
        self.say(rng.randrange(self.sessions), owner, rng.choice(templates).format(v=v, pet=pet), topic)
        if rng.random() < 0.5:  # another speaker, the same kind of fact, another value
            other = rng.choice([s for s in self.speakers if s != owner])
            self.say(rng.randrange(self.sessions), other,
                     rng.choice(templates).format(v=self.value(kind), pet=pet), topic, asked=False)
        self.ask(question.format(p=owner, pet=pet), [v], "single")

    def updated(self, kind: str) -> None:
        rng = self.rng
        topic, pool, first, then, question = _UPDATED[kind]
        owner = rng.choice(self.speakers)
        old, new = self.value(pool), self.value(pool)
        a, b = sorted(rng.sample(range(self.sessions), 2))
        self.say(a, owner, rng.choice(first).format(v=old), topic)
        self.say(b, owner, rng.choice(then).format(v=new, o=old), topic)
        self.ask(question.format(p=owner), [new], "updated", old=old)

    def multi(self, kind: str) -> None:
        rng = self.rng
        owner = rng.choice(self.speakers)
        a, b = sorted(rng.sample(range(self.sessions), 2))
        if kind in _BRIDGE:
            topic, pool, told, question = _BRIDGE[kind]
            rel, x, v = self.value("relative"), rng.choice([p for p in _PEOPLE if p not in self.used]), self.value(pool)
            self.used.add(x)
            self.say(a, owner, rng.choice(_NAMING).format(rel=rel, x=x), "family")
            self.say(b, owner, told.format(x=x, v=v), topic)
            self.ask(question.format(p=owner, rel=rel), [v], "multi-session")
        else:
            topic, pool, one, two, question = _PAIRS[kind]
            v1, v2 = self.value(pool), self.value(pool)
            self.say(a, owner, one.format(v=v1), topic)
            self.say(b, owner, two.format(v=v2), topic)
            self.ask(question.format(p=owner), [v1, v2], "multi-session", "string_match_all")


def _filler(rng: random.Random, topic: str, said: set[str]) -> str:
    """One small-talk message: a reaction, a line on the topic, or a line and an anecdote. A topic
    line is said once per chat; once a topic's lines are used up, an anecdote stands in."""
    r = rng.random()
    if r < 0.3:
        return rng.choice(_REACTIONS)
    fresh = [x for x in _TOPICS[topic][0] if x not in said]
    if fresh:
        line = rng.choice(fresh)
    else:
        story = sentence(rng, rng.choice(TOPICS))
        line = f"Anyway, {story[0].lower()}{story[1:]}"
    said.add(line)
    if r < 0.75:
        return line
    story = " ".join(sentence(rng, rng.choice(TOPICS)) for _ in range(rng.randint(1, 4)))
    return f"{line} {rng.choice(_STORY)} {story}"


def _render(sessions: list[list[tuple[str, str, int | None]]], dates: list[datetime.date]) -> list[dict]:
    out = []
    for s, messages in enumerate(sessions):
        for j, (speaker, text, _) in enumerate(messages):
            head = f"Session {s + 1} — {_date(dates[s])}\n" if j == 0 else ""
            role = "user" if len(out) % 2 == 0 else "assistant"
            out.append({"role": role, "content": f"{head}{speaker}: {text}"})
    return out


def _one(tok: Any, rng: random.Random, length: int, sessions: int, per_kind: int
         ) -> tuple[list[dict], list[Question], dict]:
    speakers = rng.sample(_SPEAKERS, rng.randint(3, 4))
    day = datetime.date(2023, 1, 1) + datetime.timedelta(days=rng.randrange(600))
    dates = []
    for _ in range(sessions):
        dates.append(day)
        day += datetime.timedelta(days=rng.randint(2, 45))
    facts = _Facts(rng, speakers, sessions)
    for kind in rng.sample(sorted(_SINGLE), per_kind):
        facts.single(kind)
    for kind in rng.sample(sorted(_UPDATED), per_kind):
        facts.updated(kind)
    for kind in rng.sample(sorted({**_BRIDGE, **_PAIRS}), per_kind):
        facts.multi(kind)

    # Topics: a walk that drifts to a neighbour or returns to an earlier topic; facts add theirs.
    walk = [rng.choice(sorted(_TOPICS))]
    for _ in range(sessions - 1):
        if rng.random() < 0.35:
            walk.append(rng.choice(walk))
        else:
            walk.append(rng.choice(_TOPICS[walk[-1]][1]))
    topics = [[t] for t in walk]
    fixed: list[list[tuple[str, str, int | None]]] = [[] for _ in range(sessions)]
    for s, speaker, text, topic, fact in facts.statements:
        fixed[s].append((speaker, text, fact))
        if topic not in topics[s]:
            topics[s].append(topic)

    # Filler, counted per message (content tokens + the template's cost of one message).
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    overhead = (chat_tokens(tok, probe + probe) - chat_tokens(tok, probe)) / 2 - 1
    frame = chat_tokens(tok, probe) - 2 * (1 + overhead)  # what the template adds once (a system prompt)
    head = sum(ntok(tok, f"Session {s + 1} — {_date(d)}\n") for s, d in enumerate(dates))
    total = frame + head + sum(ntok(tok, f"{sp}: {t}") + overhead for row in fixed for sp, t, _ in row)
    if total > 0.9 * length:
        raise KVBudgetError(f"length {length} is too short for {sessions} sessions and {per_kind} facts of each "
                            f"kind: they alone take about {int(total)} tokens; ask for at least {int(total / 0.9) + 1}")
    weight = [rng.uniform(0.3, 2.0) for _ in range(sessions)]  # unequal gaps between facts
    talk: list[list[tuple[str, str, int | None]]] = [[] for _ in range(sessions)]
    said: set[str] = set()
    while total < length:
        s = rng.choices(range(sessions), weight)[0]
        topic = topics[s][0] if rng.random() < 0.6 else rng.choice(topics[s])
        last = talk[s][-1][0] if talk[s] else None
        speaker = rng.choice([p for p in speakers if p != last])
        text = _filler(rng, topic, said)
        cost = ntok(tok, f"{speaker}: {text}") + overhead
        gap = length - total
        if cost > gap:  # fit the last message to the gap: a reaction or a plain line
            options = _REACTIONS + _TOPICS[topic][0]
            text = min(options, key=lambda t: abs(ntok(tok, f"{speaker}: {t}") + overhead - gap))
            cost = ntok(tok, f"{speaker}: {text}") + overhead
            if abs(gap - cost) >= gap:
                break
        talk[s].append((speaker, text, None))
        total += cost

    # Facts go between the small talk at random places, in their order within a session.
    merged = []
    for s in range(sessions):
        row = list(talk[s])
        slots = sorted(rng.choices(range(len(row) + 1), k=len(fixed[s])))
        for k, (at, msg) in enumerate(zip(slots, fixed[s])):
            row.insert(at + k, msg)
        merged.append(row)
    # Where each question's statements are: (session, message index), in the context's order.
    evidence: list[list[list[int]]] = [[] for _ in facts.facts]
    at = 0
    for s, row in enumerate(merged):
        for _, _, fact in row:
            if fact is not None:
                evidence[fact].append([s + 1, at])
            at += 1
    order = rng.sample(range(len(facts.facts)), len(facts.facts))
    questions = [facts.facts[j]["question"] for j in order]
    meta = [{"category": facts.facts[j]["question"].category, "evidence": evidence[j],
             **({"old": facts.facts[j]["old"]} if facts.facts[j]["old"] else {})} for j in order]
    return _render(merged, dates), questions, {"speakers": speakers, "facts": meta}


def chat(tok: Any, n: int, length: int, seed: int, *, sessions: int | None = None,
         per_kind: int | None = None) -> list[Task]:
    """``n`` group chats of 3-4 speakers over ``sessions`` dated sessions, ``length`` tokens long
    (chat template included, within 5%), with ``per_kind`` questions of each category (single,
    updated, multi-session). Defaults grow with the length: 3-10 sessions, 1-3 per kind."""
    sessions = sessions if sessions is not None else max(3, min(10, length // 150))
    per_kind = per_kind if per_kind is not None else max(1, min(3, length // 300))
    if sessions < 2:
        raise KVBudgetError(f"sessions must be at least 2 (got {sessions})")
    if not 1 <= per_kind <= len(_UPDATED):
        raise KVBudgetError(f"per_kind must be between 1 and {len(_UPDATED)} (got {per_kind})")
    rng = random.Random(f"chat/{seed}")
    tasks = []
    for i in range(n):
        messages, questions, facts = _one(tok, rng, length, sessions, per_kind)
        meta = {"generator": "chat", "length": length, "seed": seed, "sessions": sessions, "index": i, **facts}
        tasks.append(Task(id=f"chat-{seed}-{i:04d}", context=messages, questions=questions, meta=meta))
    return tasks
