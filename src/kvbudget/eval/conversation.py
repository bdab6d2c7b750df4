"""The `conversation` generator (LongConvQA-style): a long multi-session chat
between a user and an assistant about several topics, with facts about the user planted in
specific sessions and small talk in between.

Question kinds (``category``):
- ``single-hop``: a fact stated once ("My dog is called Biscuit." -> "What is my dog called?");
- ``update``: a value that changed in a later session ("I live in Lyon." ... "I just moved from
  Lyon to Oslo." -> "Which city do I live in now?" -> Oslo);
- ``two-hop``: two facts from different sessions ("My sister is Mara." ... "Mara started
  working as a pilot." -> "What job does my sister have?");
- ``temporal``: which session a fact came up in ("In which session did I tell you about my
  trip to Kyoto?" -> "session 3").

The context is a list of chat messages (``user`` / ``assistant``); each session starts with a
user message headed ``[Session k - date]``. Length is counted with the model's chat template.
"""

from __future__ import annotations

import random
from typing import Any

from .prose import TOPICS, sentence
from .taskfile import Question, Task

_DATES = ["2 March", "9 March", "17 March", "28 March", "6 April", "15 April", "27 April",
          "5 May", "19 May", "1 June", "14 June", "30 June"]
_NAMES = ["Biscuit", "Pepper", "Juniper", "Maple", "Clover", "Nutmeg", "Ziggy", "Waffles",
          "Pickles", "Tofu", "Olive", "Mochi"]
_PETS = ["dog", "cat", "parrot", "rabbit", "tortoise", "hamster"]
_CITIES = ["Lyon", "Oslo", "Porto", "Krakow", "Dublin", "Seville", "Tallinn", "Bergen",
           "Ghent", "Bologna", "Leeds", "Graz"]
_RELATIVES = ["sister", "brother", "cousin", "aunt", "uncle", "niece"]
_RELATIVE_NAMES = ["Mara", "Tobias", "Ines", "Rafael", "Selma", "Viktor", "Nora", "Elio",
                   "Greta", "Hugo", "Lena", "Oskar"]
_JOBS = ["pilot", "dentist", "architect", "baker", "librarian", "firefighter", "chemist",
         "gardener", "journalist", "plumber"]
_TRIPS = ["Kyoto", "Lisbon", "Marrakesh", "Reykjavik", "Vienna", "Cusco", "Hanoi", "Quebec"]
_FOODS = ["lentil soup", "mushroom risotto", "fish tacos", "apple crumble", "pad thai",
          "goulash", "falafel", "paella"]
_INSTRUMENTS = ["cello", "banjo", "trumpet", "harp", "accordion", "violin"]

# Small talk per topic: (user line, assistant reply) templates; {x} slots from the pools above.
_SMALL_TALK: dict[str, list[tuple[str, str]]] = {
    "travel": [
        ("I have been looking at train routes for the summer.", "Trains are a relaxing way to see a country. Do you prefer night trains or day trips?"),
        ("The airport queues last time were awful.", "That is tiring. Arriving early and packing light usually helps a lot."),
        ("I always forget to pack an adapter.", "A small checklist on your phone can save you from that next time."),
        ("My friend recommended a guidebook about old towns.", "Guidebooks about old towns often have lovely walking routes. Did you buy it?"),
        ("I would love to see the northern lights one day.", "They are spectacular. Late autumn and winter give the best chances."),
    ],
    "pets": [
        ("The vet said we should change the food brand.", "Switching slowly over a week or so usually keeps the stomach happy."),
        ("We bought a new basket, but it sleeps on the sofa anyway.", "Pets do love choosing their own spots. Maybe put a blanket on the sofa."),
        ("It keeps waking me up at six in the morning.", "An evening walk or play session can help it sleep a little longer."),
        ("I am thinking about a pet camera for when I work late.", "A camera can be reassuring. Some also let you talk through a speaker."),
    ],
    "work": [
        ("The quarterly meeting ran two hours over.", "Long meetings are draining. A clear agenda sent in advance can keep them short."),
        ("My manager wants a new report every Friday.", "Maybe a template would make the Friday report quicker to prepare."),
        ("I finally cleaned up my desk today.", "A tidy desk can make the whole week feel lighter."),
        ("We got new laptops at the office.", "New equipment is nice. Did the setup go smoothly?"),
        ("I am trying to stop answering emails after eight.", "That is a healthy boundary. Turning off notifications helps."),
    ],
    "food": [
        ("I tried baking bread, but it came out flat.", "The yeast may have been old, or the dough needed a longer rise."),
        ("We found a small market with fresh herbs.", "Fresh herbs make such a difference. Basil and parsley are great to start with."),
        ("I am cooking for eight people on Saturday.", "A big one-pot dish keeps things simple when you cook for a crowd."),
        ("My spice drawer is a complete mess.", "Labelled jars sorted by use can make cooking much calmer."),
    ],
    "family": [
        ("My parents are visiting next month.", "That sounds nice. Are you planning anything special with them?"),
        ("We had a long phone call with my grandmother.", "Those calls mean a lot. How is she doing?"),
        ("The family group chat is very busy this week.", "Group chats can get lively around holidays and birthdays."),
        ("We are planning a picnic for the whole family.", "A picnic is a great idea. A park with shade would be ideal."),
    ],
    "hobbies": [
        ("I joined a small choir on Tuesdays.", "Singing with others is a wonderful way to unwind."),
        ("I started a puzzle with two thousand pieces.", "That is ambitious! Sorting the edge pieces first helps."),
        ("The weather was perfect for a long bike ride.", "Cycling on a good day is hard to beat. Where did you ride?"),
        ("I have been reading a mystery novel every week.", "Mystery novels are so gripping. Do you guess the ending?"),
    ],
}


def _facts(rng: random.Random) -> list[dict]:
    """Planted facts, each: topic, user line(s) with the session order they need, question."""
    pet, pet_name = rng.choice(_PETS), rng.choice(_NAMES)
    city_a, city_b = rng.sample(_CITIES, 2)
    relative, rel_name, job = rng.choice(_RELATIVES), rng.choice(_RELATIVE_NAMES), rng.choice(_JOBS)
    trip, food, instrument = rng.choice(_TRIPS), rng.choice(_FOODS), rng.choice(_INSTRUMENTS)
    return [
        {"topic": "pets", "lines": [f"By the way, my {pet} is called {pet_name}."],
         "replies": [f"{pet_name} is a lovely name for a {pet}!"],
         "q": f"What is my {pet} called?", "a": pet_name, "cat": "single-hop"},
        {"topic": "food", "lines": [f"My favourite dish to cook is {food}."],
         "replies": [f"{food.capitalize()} sounds delicious!"],
         "q": "What is my favourite dish to cook?", "a": food, "cat": "single-hop"},
        {"topic": "hobbies", "lines": [f"I have started taking {instrument} lessons."],
         "replies": [f"The {instrument} is a beautiful instrument. Enjoy the lessons!"],
         "q": "Which instrument am I learning?", "a": instrument, "cat": "single-hop"},
        {"topic": "family", "lines": [f"I live in {city_a} at the moment.",
                                      f"Big news: I just moved from {city_a} to {city_b}."],
         "replies": [f"{city_a} is a nice city to live in.", f"Congratulations on the move to {city_b}!"],
         "q": "Which city do I live in now?", "a": city_b, "cat": "update"},
        {"topic": "family", "lines": [f"My {relative} is called {rel_name}.",
                                      f"{rel_name} has started working as a {job}."],
         "replies": [f"{rel_name} is a nice name.", f"A {job}? Good for {rel_name}!"],
         "q": f"What job does my {relative} have?", "a": job, "cat": "two-hop"},
        {"topic": "travel", "lines": [f"I just booked a trip to {trip}."],
         "replies": [f"A trip to {trip} will be wonderful!"],
         "q": f"In which session did I tell you about my trip to {trip}?", "a": "session {s}",
         "cat": "temporal"},
    ]


def chat_tokens(tok: Any, messages: list[dict]) -> int:
    """Tokens of the chat as a session feeds it (chat template included)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in messages)
    return len(tok(text, add_special_tokens=False).input_ids)


def _content_tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def _render(talk: dict[int, list], placed: dict[int, list], dates: list[int]) -> list[dict]:
    """Chat messages: per session its small talk with the planted exchanges slotted in early."""
    out = []
    for s in range(len(talk)):
        exchanges = list(talk[s])
        for j, (line, reply) in enumerate(placed[s]):
            exchanges.insert(min(len(exchanges), 1 + 2 * j), (line, reply))
        head = f"[Session {s + 1} - {_DATES[dates[s]]}] "
        for j, (user, assistant) in enumerate(exchanges):
            out.append({"role": "user", "content": (head if j == 0 else "") + user})
            out.append({"role": "assistant", "content": assistant})
    return out


def conversation(tok: Any, n: int, length: int, seed: int, *, sessions: int = 5) -> list[Task]:
    """``n`` multi-session user/assistant chats of ``length`` tokens (chat template included,
    within 5%) with six planted facts (single-hop, update, two-hop, temporal) asked back."""
    rng = random.Random(f"conversation/{seed}")
    tasks = []
    for i in range(n):
        facts = _facts(rng)
        dates = sorted(rng.sample(range(len(_DATES)), sessions))
        # Where each fact line goes: distinct sessions, later lines of a fact in later sessions.
        placed: dict[int, list[tuple[str, str]]] = {s: [] for s in range(sessions)}
        questions = []
        for fact in facts:
            k = len(fact["lines"])
            at = sorted(rng.sample(range(sessions), k))
            for s, line, reply in zip(at, fact["lines"], fact["replies"]):
                placed[s].append((line, reply))
            answer = fact["a"].format(s=at[0] + 1)
            questions.append(Question(question=fact["q"], answers=[answer], metric="contains",
                                      category=fact["cat"]))
        rng.shuffle(questions)
        # Grow every session with small talk until the whole chat reaches the length.
        talk = {s: [] for s in range(sessions)}
        topics = list(_SMALL_TALK)
        session_topic = {s: rng.sample(topics, 2) for s in range(sessions)}

        messages = _render(talk, placed, dates)
        # Count incrementally (template overhead per exchange measured once), check exactly at the end.
        total = chat_tokens(tok, messages)
        pair = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        overhead = chat_tokens(tok, messages + pair) - total - 2
        while total < 0.98 * length:
            s = rng.randrange(sessions)
            user, assistant = rng.choice(_SMALL_TALK[rng.choice(session_topic[s])])
            if rng.random() < 0.6:  # an anecdote from the prose grammar keeps small talk varied
                lead = user if user.startswith("I ") else user[0].lower() + user[1:]
                user = f"{sentence(rng, rng.choice(TOPICS))} Anyway, {lead}"
            talk[s].append((user, assistant))
            total += _content_tokens(tok, user) + _content_tokens(tok, assistant) + overhead
        messages = _render(talk, placed, dates)
        tasks.append(Task(id=f"conversation-{seed}-{i:04d}", context=messages, questions=questions))
    return tasks
