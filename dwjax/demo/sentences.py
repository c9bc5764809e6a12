"""Seeded generator of plain English sentences for the synthetic demo set.

The sentences are built from small word lists and templates kept in this module. The vocabulary is
deliberately everyday (household objects, places, days, small numbers, common first names) so that a
Whisper teacher transcribes the synthesised speech almost perfectly; the point of the demo set is to
exercise the pipeline, not to be hard. The combinations give millions of distinct sentences, so even
a demo set of many hours repeats almost nothing.

    generate_sentences(count, seed) -> list[str]   # unique, prefix-stable for a given seed
    iter_sentences(seed)            -> Iterator[str]  # the same stream, unbounded
    number_to_words(n)              -> str            # 342 -> "three hundred and forty two"
    translated_sentences(language)  -> list[(sentence, English translation)]   # de, fr, es, it

Other languages: `multilingual_sentences.tsv` beside this module holds a few dozen sentences per language,
written for the demo (everyday words, as the English ones), each with an English translation (the references of
the translate sets).
"""
from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Callable, Iterator

from dwjax.errors import UserError

__all__ = ["generate_sentences", "iter_sentences", "make_sentence", "number_to_words", "translated_sentences",
           "sentence_languages"]

NAMES = (
    "Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Isabel", "Jack", "Kate",
    "Laura", "Martin", "Nina", "Oliver", "Paul", "Rachel", "Sam", "Tom", "Helen", "Peter", "Sarah",
    "James", "Lucy", "Michael", "Alice", "George", "Julia", "Daniel", "Sophie", "Robert", "Maria",
    "Simon", "Linda", "Steven", "Karen", "Andrew", "Emily", "Thomas", "Hannah", "Mark", "Rose",
    "Chris", "Amy", "Joe", "Ruth", "Adam", "Clare", "Luke", "Jane", "Matthew", "Eva", "Victor",
)

PEOPLE = (
    "my brother", "my sister", "my mother", "my father", "our neighbour", "the teacher", "the doctor",
    "the driver", "the old man", "the young woman", "my friend", "her uncle", "his aunt", "the farmer",
    "the baker", "the manager", "a student", "the children", "our guests", "the nurse", "the waiter",
    "the police officer", "the new boss", "my cousin", "the shop owner", "the pilot", "my grandmother",
    "the little boy", "the girl next door", "the team", "the captain", "the cook", "our landlord",
)
PRONOUNS = ("I", "we", "they", "she", "he", "you")

# (base form, past tense) of verbs that take a concrete object
VERBS = (
    ("buy", "bought"), ("find", "found"), ("paint", "painted"), ("clean", "cleaned"), ("open", "opened"),
    ("carry", "carried"), ("sell", "sold"), ("fix", "fixed"), ("borrow", "borrowed"), ("wash", "washed"),
    ("order", "ordered"), ("lose", "lost"), ("move", "moved"), ("repair", "repaired"), ("pack", "packed"),
    ("drop", "dropped"), ("check", "checked"), ("bring", "brought"), ("leave", "left"), ("hide", "hid"),
    ("build", "built"), ("keep", "kept"), ("send", "sent"), ("choose", "chose"), ("lend", "lent"),
    ("return", "returned"), ("cover", "covered"), ("measure", "measured"),
    ("deliver", "delivered"), ("collect", "collected"), ("count", "counted"), ("share", "shared"),
    ("sort", "sorted"), ("drop off", "dropped off"), ("pick up", "picked up"), ("look at", "looked at"),
    ("put away", "put away"), ("throw away", "threw away"), ("give away", "gave away"),
)

ADJECTIVES = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "grey", "small", "large", "heavy",
    "light", "new", "old", "clean", "dirty", "broken", "wooden", "metal", "plastic", "round", "square",
    "tall", "short", "cheap", "expensive", "soft", "warm", "cold", "bright", "dark", "empty", "full",
    "little", "big", "quiet", "noisy", "shiny", "strange", "beautiful", "simple", "tiny", "orange",
)

# (singular, plural)
NOUNS = (
    ("box", "boxes"), ("chair", "chairs"), ("table", "tables"), ("lamp", "lamps"), ("bicycle", "bicycles"),
    ("book", "books"), ("bottle", "bottles"), ("cup", "cups"), ("plate", "plates"), ("bag", "bags"),
    ("basket", "baskets"), ("coat", "coats"), ("hat", "hats"), ("key", "keys"), ("window", "windows"),
    ("door", "doors"), ("clock", "clocks"), ("letter", "letters"), ("map", "maps"), ("ladder", "ladders"),
    ("bucket", "buckets"), ("blanket", "blankets"), ("pillow", "pillows"), ("jacket", "jackets"),
    ("phone", "phones"), ("camera", "cameras"), ("radio", "radios"), ("suitcase", "suitcases"),
    ("umbrella", "umbrellas"), ("ticket", "tickets"), ("picture", "pictures"), ("mirror", "mirrors"),
    ("shoe", "shoes"), ("glass", "glasses"), ("knife", "knives"), ("fork", "forks"), ("spoon", "spoons"),
    ("bowl", "bowls"), ("pot", "pots"), ("pan", "pans"), ("candle", "candles"), ("towel", "towels"),
    ("sofa", "sofas"), ("desk", "desks"), ("shelf", "shelves"), ("car", "cars"), ("boat", "boats"),
    ("kite", "kites"), ("ball", "balls"), ("toy", "toys"), ("rope", "ropes"), ("tent", "tents"),
    ("computer", "computers"), ("printer", "printers"), ("notebook", "notebooks"), ("pencil", "pencils"),
    ("envelope", "envelopes"), ("parcel", "parcels"), ("flower", "flowers"), ("tree", "trees"),
    ("apple", "apples"), ("orange", "oranges"), ("sandwich", "sandwiches"), ("cake", "cakes"),
    ("guitar", "guitars"), ("piano", "pianos"), ("drum", "drums"), ("wallet", "wallets"),
    ("watch", "watches"), ("ring", "rings"), ("scarf", "scarves"), ("glove", "gloves"), ("sock", "socks"),
)

PLACES = (
    "in the kitchen", "in the garden", "at the market", "near the river", "by the front door",
    "in the garage", "at the station", "on the top shelf", "under the bed", "behind the house",
    "at the office", "in the car", "at the school", "in the park", "at the hospital", "on the beach",
    "in the library", "at the bakery", "near the bridge", "on the bus", "in the basement",
    "at the airport", "in the hotel room", "at the corner shop", "in the living room", "on the farm",
    "at the post office", "in the hallway", "on the balcony", "at the museum", "in the village",
    "in the city centre", "at the sports hall", "beside the lake", "on the kitchen table",
    "in the attic", "at the petrol station", "in the waiting room", "at the bus stop",
)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
PARTS_OF_DAY = ("morning", "afternoon", "evening", "night")
PAST_TIMES = (
    "yesterday", "last week", "last night", "this morning", "two days ago", "after lunch",
    "before breakfast", "last summer", "a few minutes ago", "earlier today", "last month",
    "after the meeting", "during the storm", "on the way home",
)
FUTURE_TIMES = (
    "tomorrow", "next week", "tonight", "later today", "after dinner", "next month", "this weekend",
    "before the party", "in the morning", "next summer", "soon", "after school",
)
EVENTS = (
    "the party", "the wedding", "the trip", "the meeting", "the concert", "the picnic", "the match",
    "the school play", "the birthday dinner", "the holiday", "the class", "the show",
)
VEHICLES = ("train", "bus", "ferry", "plane", "taxi", "coach", "boat")
FOODS = (
    "soup", "bread", "rice", "pasta", "fish", "chicken", "salad", "cheese", "coffee", "tea", "milk",
    "orange juice", "chocolate", "porridge", "potatoes", "eggs", "pancakes", "vegetables", "fruit",
)
WEATHER = ("cold", "warm", "windy", "wet", "sunny", "cloudy", "foggy", "hot", "dry", "grey", "bright")
FEELINGS = ("happy", "tired", "hungry", "surprised", "worried", "excited", "bored", "calm", "busy",
            "sleepy", "pleased", "nervous", "late", "ready")
ACTIVITIES = (
    "reading", "cooking", "walking the dog", "cleaning the windows", "playing cards", "writing letters",
    "watching the news", "fixing the fence", "painting the kitchen", "learning to swim",
    "planting tomatoes", "baking bread", "playing the piano", "washing the car", "studying for an exam",
)
UNITS = (
    ("minute", "minutes"), ("hour", "hours"), ("day", "days"), ("week", "weeks"),
    ("kilometre", "kilometres"), ("metre", "metres"), ("page", "pages"), ("mile", "miles"),
)

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(n: int) -> str:
    """Spell a whole number from 0 to 999,999 in British style ("one hundred and five")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words handles 0..999999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" and {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    words = f"{number_to_words(thousands)} thousand"
    if rest:
        words += (" and " if rest < 100 else " ") + number_to_words(rest)
    return words


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class _Draw:
    """Helpers that draw slot fillers from one `random.Random`."""

    def __init__(self, rng: random.Random):
        self.r = rng

    def pick(self, seq):
        return seq[self.r.randrange(len(seq))]

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def name(self) -> str:
        return self.pick(NAMES)

    def person(self) -> str:
        """A third-person subject: a name, or a described person."""
        return self.name() if self.chance(0.45) else self.pick(PEOPLE)

    def subject(self) -> str:
        roll = self.r.random()
        if roll < 0.2:
            return self.pick(PRONOUNS)
        if roll < 0.35:
            return f"{self.name()} and {self.name()}" if self.chance(0.5) else f"{self.name()} and I"
        return self.person()

    def number(self, low: int = 2, high: int = 60) -> str:
        """A count, written as words or as digits (the teachers hear the same either way)."""
        n = self.r.randint(low, high)
        return str(n) if self.chance(0.5) else number_to_words(n)

    def thing(self) -> str:
        """A noun phrase: 'the old lamp', 'a blue cup', 'three heavy boxes', 'Anna's umbrella'."""
        single, plural = self.pick(NOUNS)
        adjective = self.pick(ADJECTIVES) + " " if self.chance(0.7) else ""
        roll = self.r.random()
        if roll < 0.35:
            return f"the {adjective}{single}"
        if roll < 0.6:
            return _a(f"{adjective}{single}")
        if roll < 0.8:
            return f"{self.number(2, 30)} {adjective}{plural}"
        if roll < 0.9:
            return f"{self.name()}'s {adjective}{single}"
        return f"some {adjective}{plural}"

    def plural_noun(self) -> str:
        return self.pick(NOUNS)[1]

    def clock(self) -> str:
        hour = self.r.randint(1, 12)
        if self.chance(0.5):
            return f"{hour if self.chance(0.5) else number_to_words(hour)} o'clock"
        minutes = self.pick((15, 20, 30, 45))
        word = {15: "quarter past", 30: "half past", 45: "quarter to"}.get(minutes)
        if word:
            return f"{word} {number_to_words(hour if minutes != 45 else hour % 12 + 1)}"
        return f"twenty past {number_to_words(hour)}"

    def past_time(self) -> str:
        roll = self.r.random()
        if roll < 0.35:
            return self.pick(PAST_TIMES)
        if roll < 0.6:
            return f"on {self.pick(DAYS)} {self.pick(PARTS_OF_DAY)}" if self.chance(0.5) else f"last {self.pick(DAYS)}"
        if roll < 0.8:
            return f"at {self.clock()}"
        if roll < 0.9:
            return f"in {self.pick(MONTHS)}"
        return f"{self.number(2, 12)} {self.pick(UNITS[2:4])[1]} ago"

    def future_time(self) -> str:
        roll = self.r.random()
        if roll < 0.45:
            return self.pick(FUTURE_TIMES)
        if roll < 0.7:
            return f"on {self.pick(DAYS)}"
        if roll < 0.9:
            return f"at {self.clock()}"
        return f"next {self.pick(DAYS)}"


# Each template returns one sentence (without the final capitalisation).
def _t_did(d: _Draw) -> str:
    base, past = d.pick(VERBS)
    tail = " ".join(x for x in (d.pick(PLACES) if d.chance(0.6) else "", d.past_time() if d.chance(0.7) else "") if x)
    return f"{d.subject()} {past} {d.thing()}{' ' + tail if tail else ''}."


def _t_time_first(d: _Draw) -> str:
    base, past = d.pick(VERBS)
    return f"{d.past_time()}, {d.subject()} {past} {d.thing()} {d.pick(PLACES)}."


def _t_will(d: _Draw) -> str:
    base, _ = d.pick(VERBS)
    helper = d.pick(("will", "will", "is going to", "might", "should", "can", "has to"))
    subj = d.person()
    return f"{subj} {helper} {base} {d.thing()} {d.future_time()}."


def _t_question(d: _Draw) -> str:
    base, _ = d.pick(VERBS)
    roll = d.r.random()
    if roll < 0.2:
        return f"did {d.subject()} {base} {d.thing()} {d.pick(PLACES)}?"
    if roll < 0.35:
        return f"where did {d.person()} put {d.thing()}?"
    if roll < 0.5:
        return f"how many {d.plural_noun()} are there {d.pick(PLACES)}?"
    if roll < 0.65:
        return f"can you {base} {d.thing()} before {d.pick(EVENTS)}?"
    if roll < 0.75:
        return f"what time does the {d.pick(VEHICLES)} leave on {d.pick(DAYS)}?"
    if roll < 0.85:
        return f"why was {d.person()} so {d.pick(FEELINGS)} {d.past_time()}?"
    return f"who is going to {base} {d.thing()} {d.future_time()}?"


def _t_count(d: _Draw) -> str:
    roll = d.r.random()
    if roll < 0.3:
        return f"there are {d.number(2, 99)} {d.plural_noun()} {d.pick(PLACES)}."
    if roll < 0.55:
        return f"{d.person()} counted {d.number(2, 400)} {d.plural_noun()} {d.past_time()}."
    if roll < 0.75:
        return f"we need {d.number(2, 40)} more {d.plural_noun()} for {d.pick(EVENTS)}."
    _, plural = d.pick(UNITS[:3])
    n = d.r.randint(2, 90)
    amount = str(n) if d.chance(0.5) else number_to_words(n)
    return f"the {d.pick(VEHICLES)} to {d.name()}'s village takes {amount} {plural}."


def _t_weather(d: _Draw) -> str:
    a, b = d.r.sample(WEATHER, 2)
    roll = d.r.random()
    if roll < 0.5:
        return f"it was {a} and {b} {d.past_time()}, so {d.subject()} stayed {d.pick(PLACES)}."
    return f"the radio says it will be {a} {d.future_time()}."


def _t_request(d: _Draw) -> str:
    base, _ = d.pick(VERBS)
    roll = d.r.random()
    if roll < 0.4:
        return f"please {base} {d.thing()} {d.pick(PLACES)}."
    if roll < 0.7:
        return f"don't forget to {base} {d.thing()} {d.future_time()}."
    return f"could you ask {d.person()} to {base} {d.thing()}?"


def _t_reported(d: _Draw) -> str:
    base, _ = d.pick(VERBS)
    verb = d.pick(("said", "told me", "wrote", "promised", "mentioned"))
    return f"{d.name()} {verb} that {d.person()} would {base} {d.thing()} {d.future_time()}."


def _t_activity(d: _Draw) -> str:
    roll = d.r.random()
    if roll < 0.4:
        return f"{d.person()} spent {d.number(2, 12)} hours {d.pick(ACTIVITIES)} {d.past_time()}."
    if roll < 0.7:
        return f"{d.subject()} felt {d.pick(FEELINGS)} after {d.pick(ACTIVITIES)} {d.pick(PLACES)}."
    return f"{d.person()} likes {d.pick(ACTIVITIES)} on {d.pick(DAYS)} {d.pick(PARTS_OF_DAY)}s."


def _t_food(d: _Draw) -> str:
    a, b = d.r.sample(FOODS, 2)
    roll = d.r.random()
    if roll < 0.4:
        return f"for {d.pick(('breakfast', 'lunch', 'dinner'))} {d.subject()} had {a} and {b}."
    if roll < 0.7:
        return f"{d.person()} made {a} for {d.number(2, 20)} people {d.past_time()}."
    return f"would you like some {a} or some {b}?"


def _t_compound(d: _Draw) -> str:
    (_, p1), (_, p2) = d.pick(VERBS), d.pick(VERBS)
    joint = d.pick(("and then", "but", "so", "while"))
    return f"{d.person()} {p1} {d.thing()}, {joint} {d.person()} {p2} {d.thing()}."


def _t_appointment(d: _Draw) -> str:
    n = d.r.randint(1, 28)
    day = d.pick(("first", "second", "third")) if n <= 3 else None
    date = f"{d.pick(MONTHS)} the {day}" if day else f"{d.pick(MONTHS)} {n}"
    what = d.pick(("the dentist", "the doctor", "the bank", "the school", "the garage", "the hairdresser"))
    return f"{d.name()} has an appointment at {what} on {date} at {d.clock()}."


def _t_opinion(d: _Draw) -> str:
    single, _ = d.pick(NOUNS)
    return (f"{d.pick(('I think', 'she thinks', 'he says', 'everyone agrees', 'we all felt'))} that the "
            f"{single} {d.pick(PLACES)} looks {d.pick(ADJECTIVES)}.")


# (template, relative weight)
TEMPLATES: tuple[tuple[Callable[[_Draw], str], float], ...] = (
    (_t_did, 4.0), (_t_time_first, 2.0), (_t_will, 2.0), (_t_question, 3.0), (_t_count, 2.0),
    (_t_weather, 1.0), (_t_request, 1.5), (_t_reported, 1.5), (_t_activity, 1.5), (_t_food, 1.0),
    (_t_compound, 1.5), (_t_appointment, 0.7), (_t_opinion, 0.8),
)
_WEIGHTS = [w for _, w in TEMPLATES]


def _capitalise(sentence: str) -> str:
    """Upper-case the first letter; a sentence never starts with digits, so spell a leading number."""
    head, _, rest = sentence.partition(" ")
    if head.isdigit():
        sentence = f"{number_to_words(int(head))} {rest}"
    return sentence[:1].upper() + sentence[1:]


def make_sentence(rng: random.Random) -> str:
    """One sentence drawn with `rng` (may repeat; `iter_sentences` removes repeats)."""
    template = rng.choices([t for t, _ in TEMPLATES], weights=_WEIGHTS)[0]
    return _capitalise(template(_Draw(rng)))


def iter_sentences(seed: int = 0) -> Iterator[str]:
    """An unbounded stream of distinct sentences; the same seed always gives the same stream."""
    rng = random.Random(f"dwjax-sentences:{seed}")
    seen: set[str] = set()
    while True:
        sentence = make_sentence(rng)
        if sentence not in seen:
            seen.add(sentence)
            yield sentence


def generate_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` distinct sentences; a longer list with the same seed starts with the shorter one."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    stream = iter_sentences(seed)
    return [next(stream) for _ in range(count)]


_TRANSLATED = Path(__file__).with_name("multilingual_sentences.tsv")


@functools.lru_cache(maxsize=1)
def _translated() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for line in _TRANSLATED.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            language, sentence, english = line.split("\t")
            out.setdefault(language, []).append((sentence, english))
    return out


def sentence_languages() -> list[str]:
    """The languages other than English that `translated_sentences` has sentences for."""
    return sorted(_translated())


def translated_sentences(language: str) -> list[tuple[str, str]]:
    """(sentence, English translation) of every sentence written for `language` (a Whisper code)."""
    table = _translated()
    if language not in table:
        raise UserError(f"no demo sentences for language {language!r}; there are sentences for en and "
                        f"{', '.join(sorted(table))}")
    return list(table[language])
