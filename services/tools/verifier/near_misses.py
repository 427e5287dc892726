"""Generated question pairs: near-misses (negatives) and meaning-preserving rewrites (positives).

Written for this project, by rule; nothing here is copied from a published test suite. A
*frame* is one intent with slots ("convert {a} to {b}") and several surface forms that mean the
same. Slot values are synonym groups: a value keeps its meaning under any of its surfaces
("USD", "US dollars"). For each drawn instance of a frame the generator emits one positive (the
same slots under another form, another synonym, an irrelevant preamble, another case) and one
near-miss that changes the meaning by one rule of the frame:

- ``swap``: the two arguments of an asymmetric relation exchanged ("EUR to USD" / "USD to EUR",
  "cheaper than", "before", "from A to B", active/passive with the roles changed); in a
  symmetric frame ("distance between A and B") the swap is a positive;
- ``negation``: the frame's negated forms (negation in or out);
- substitution of one slot, named by the slot's kind: ``antonym`` (more / less, increase /
  decrease, before / after), ``number`` (numbers, dates, amounts, units), ``entity`` (names,
  places, products), ``modifier`` (a modifier that changes the meaning added, dropped or
  changed), ``pronoun`` (he / she).

Every pair carries its category. Output is deterministic for a seed (``generate``); the pairs
are split into fit and report halves by the harness's rule (sha256 of the first question), like
every other file. The six probe pairs of issue 12 are never emitted.

Standard library only: the trainer (``.venv-train``) and the harness (``.venv``) both import it.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

NAME = "generated_near_misses"
SEED = 20261201
PER_FRAME = 110  # instances drawn per frame (each gives a positive and a negative)

# The probes: kept out of the generated data word for word.
PROBES = frozenset(
    " ".join(t.casefold().split())
    for t in (
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "What is the quickest way to lose weight?",
        "How can I lose weight fast?",
        "How do I convert USD to EUR?",
        "How do I convert EUR to USD?",
        "Is it safe to take aspirin without ibuprofen?",
        "Is it safe to take aspirin with ibuprofen?",
        "Flights from London to Paris",
        "Flights from Paris to London",
        "What is the capital of Germany?",
        "What is the capital of France?",
    )
)

Group = tuple[str, ...]  # one meaning, its surfaces

CURRENCY: list[Group] = [
    ("USD", "US dollars"), ("EUR", "euros"), ("GBP", "British pounds"), ("JPY", "Japanese yen"),
    ("CAD", "Canadian dollars"), ("AUD", "Australian dollars"), ("CHF", "Swiss francs"),
    ("CNY", "Chinese yuan"), ("INR", "Indian rupees"), ("MXN", "Mexican pesos"),
    ("SEK", "Swedish kronor"), ("BRL", "Brazilian reais"), ("KRW", "South Korean won"),
]  # fmt: skip
CITY: list[Group] = [
    (c,) for c in (
        "London", "Paris", "Berlin", "Madrid", "Rome", "New York", "Tokyo", "Sydney", "Toronto",
        "Chicago", "Boston", "Dublin", "Lisbon", "Vienna", "Prague", "Amsterdam", "Seattle",
        "Denver", "Mumbai", "Delhi", "Singapore", "Bangkok", "Cairo", "Nairobi", "Lima", "Oslo",
        "Zurich", "Munich", "Milan", "Barcelona", "Athens", "Istanbul", "Seoul", "Miami",
    )
]  # fmt: skip
COUNTRY: list[Group] = [
    (c,) for c in (
        "France", "Germany", "Spain", "Italy", "Japan", "Canada", "Brazil", "India", "Australia",
        "Mexico", "Egypt", "Kenya", "Norway", "Sweden", "Poland", "Greece", "Portugal", "Chile",
        "Peru", "Turkey", "Vietnam", "Thailand", "Argentina", "Ireland", "Austria", "Finland",
    )
]  # fmt: skip
PROGRAMMING: list[Group] = [
    (c,) for c in (
        "Python", "Java", "JavaScript", "C++", "Rust", "Go", "Ruby", "PHP", "Kotlin", "Swift",
        "TypeScript", "Scala", "C#", "Perl",
    )
]  # fmt: skip
LANGUAGE: list[Group] = [
    (c,) for c in (
        "English", "French", "Spanish", "German", "Italian", "Japanese", "Chinese", "Russian",
        "Portuguese", "Arabic", "Korean", "Dutch", "Greek", "Hindi",
    )
]  # fmt: skip
WORD: list[Group] = [
    (c,) for c in (
        "thank you", "good morning", "goodbye", "cheers", "I love you", "water", "friend",
        "happy birthday", "excuse me", "welcome", "good night", "see you tomorrow",
    )
]  # fmt: skip
UNIT_PAIRS = [
    ("kilometers", "miles"), ("pounds", "kilograms"), ("inches", "centimeters"),
    ("liters", "gallons"), ("feet", "meters"), ("ounces", "grams"), ("cups", "milliliters"),
]  # fmt: skip
UNIT: list[Group] = [(u,) for pair in UNIT_PAIRS for u in pair]
DRUG: list[Group] = [
    ("aspirin",), ("ibuprofen", "Advil"), ("paracetamol", "acetaminophen", "Tylenol"),
    ("naproxen",), ("antihistamines",), ("melatonin",), ("vitamin D",), ("iron supplements",),
    ("antibiotics",), ("caffeine",), ("alcohol",), ("omeprazole",), ("cough syrup",),
]  # fmt: skip
EFFECT: list[Group] = [
    ("drowsiness", "sleepiness"), ("headaches",), ("weight gain",), ("hair loss",),
    ("insomnia", "trouble sleeping"), ("nausea",), ("high blood pressure",),
]  # fmt: skip
FOOD: list[Group] = [
    (c,) for c in (
        "rice", "pasta", "chicken", "salmon", "eggs", "broccoli", "potatoes", "quinoa", "beans",
        "tofu", "steak", "bread", "oatmeal", "spinach", "avocado", "cheese", "bananas", "lentils",
    )
]  # fmt: skip
NUTRIENT: list[Group] = [
    ("protein",), ("fiber", "fibre"), ("sugar",), ("calories",), ("iron",), ("vitamin C",),
    ("fat",), ("potassium",),
]  # fmt: skip
ANIMAL: list[Group] = [
    (c,) for c in ("dogs", "cats", "rabbits", "horses", "hamsters", "parrots", "guinea pigs")
]
DEVICE: list[Group] = [
    ("iPhone",), ("Android phone",), ("Mac", "MacBook"), ("Windows PC", "Windows laptop"),
    ("iPad",), ("Chromebook",), ("Kindle",), ("Linux machine",), ("Samsung Galaxy",),
]  # fmt: skip
ACCOUNT: list[Group] = [
    (c,) for c in (
        "Gmail", "Netflix", "Instagram", "Facebook", "Amazon", "Outlook", "Spotify", "LinkedIn",
        "PayPal", "Apple ID", "Steam", "Dropbox", "Twitter", "bank",
    )
]  # fmt: skip
CREDENTIAL: list[Group] = [
    ("password",),
    ("username", "user name"),
    ("email address",),
    ("phone number",),
    ("PIN",),
]
PERSON: list[Group] = [
    (c,) for c in (
        "Alice", "Bob", "Maria", "John", "Priya", "Ahmed", "Chen", "Sofia", "Lucas", "Emma",
        "Noah", "Olivia", "Omar", "Hana", "Diego", "Grace",
    )
]  # fmt: skip
TEAM: list[Group] = [
    (c,) for c in (
        "Brazil", "Argentina", "the Lakers", "the Celtics", "Real Madrid", "Barcelona",
        "Liverpool", "Arsenal", "the Yankees", "the Red Sox", "Bayern Munich", "Juventus",
        "Federer", "Nadal", "Djokovic", "Serena Williams",
    )
]  # fmt: skip
COMPANY: list[Group] = [
    (c,) for c in (
        "Apple", "Google", "Microsoft", "Amazon", "Tesla", "Netflix", "Samsung", "Intel", "IBM",
        "Spotify", "Oracle", "Adobe", "Uber", "Disney", "Nike", "Sony",
    )
]  # fmt: skip
EVENT: list[Group] = [
    ("the World Cup", "the FIFA World Cup"), ("the Super Bowl",), ("the Champions League",),
    ("the Tour de France",), ("Wimbledon",), ("the NBA Finals",), ("the Stanley Cup",),
]  # fmt: skip
YEAR: list[Group] = [(str(y),) for y in range(1990, 2025)]
WEEKDAY: list[Group] = [
    (d,) for d in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
]
MONTH: list[Group] = [
    (m,) for m in (
        "January", "February", "March", "April", "May", "June", "July", "August", "September",
        "October", "November", "December",
    )
]  # fmt: skip
SMALL_NUMBER: list[Group] = [(str(n),) for n in (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 50, 100)]
AMOUNT: list[Group] = [(str(n),) for n in (10, 20, 50, 100, 200, 250, 500, 1000, 1500, 5000)]
AGE: list[Group] = [(str(n),) for n in (14, 15, 16, 17, 18, 19, 21, 25, 65, 70)]
PRIME_CANDIDATE: list[Group] = [(str(n),) for n in (13, 17, 21, 31, 37, 51, 57, 71, 73, 91, 97)]
TASK: list[Group] = [
    ("reverse a list",), ("sort a dictionary by value",), ("parse JSON", "parse a JSON string"),
    ("read a CSV file",), ("make an HTTP request", "send an HTTP request"),
    ("convert a string to an integer", "turn a string into an integer"),
    ("remove duplicates from a list",), ("read a file line by line",), ("get the current date",),
]  # fmt: skip
PLACE: list[Group] = [
    ("the post office",), ("the bank",), ("the pharmacy",), ("the library",), ("the DMV",),
    ("Costco",), ("the gym",), ("the supermarket", "the grocery store"),
]  # fmt: skip
ASSET: list[Group] = [
    ("Bitcoin",), ("gold",), ("Tesla stock", "Tesla shares"), ("a house", "a home"),
    ("index funds",), ("Ethereum",), ("a used car",), ("government bonds",),
]  # fmt: skip
METRIC: list[Group] = [
    ("credit score",), ("blood pressure",), ("metabolism",), ("website traffic",),
    ("battery life",), ("cholesterol",), ("resting heart rate",), ("screen brightness",),
]  # fmt: skip
SUPERLATIVE_THING: list[Group] = [
    ("planet",), ("ocean",), ("country",), ("mammal",), ("bird",), ("desert",), ("lake",),
    ("bone in the human body",), ("organ in the human body",),
]  # fmt: skip
TIME_GAP: list[Group] = [
    (c,) for c in ("London", "Tokyo", "New York", "Sydney", "Dubai", "Los Angeles", "Moscow")
]
TRANSFER_ENDPOINT: list[Group] = [
    ("iPhone",), ("Android phone",), ("Mac",), ("Windows PC",), ("iCloud",), ("Google Drive",),
    ("an SD card",), ("an external hard drive",),
]  # fmt: skip
ACCOUNT_KIND: list[Group] = [
    ("savings", "my savings account"), ("checking", "my checking account"), ("PayPal",),
    ("Venmo",), ("a credit card",), ("a brokerage account",),
]  # fmt: skip
ROUTINE_ACT: list[Group] = [
    ("stretch",), ("eat",), ("drink coffee",), ("take a shower", "shower"), ("brush my teeth",),
    ("take my vitamins",), ("drink water",), ("meditate",),
]  # fmt: skip
ROUTINE_EVENT: list[Group] = [
    ("a run", "running"), ("breakfast",), ("a workout", "working out"), ("bed", "going to bed"),
    ("swimming",), ("a long flight",), ("an exam",),
]  # fmt: skip
DISH: list[Group] = [
    ("lasagna",), ("pancakes",), ("chili",), ("brownies",), ("curry",), ("pizza dough",),
    ("banana bread",), ("mac and cheese", "macaroni and cheese"), ("meatballs",), ("risotto",),
]  # fmt: skip
GOAL_ANTONYMS = [
    (("lose weight", "shed pounds", "slim down"), ("gain weight", "put on weight")),
    (("fall asleep", "get to sleep"), ("wake up", "stay awake")),
    (("save money",), ("spend money",)),
    (("cool down a room", "cool a room"), ("heat up a room", "warm up a room")),
    (("build muscle", "gain muscle"), ("lose muscle",)),
    (("speed up my computer", "make my computer faster"), ("slow down my computer",)),
]  # fmt: skip
GOALS: list[Group] = [g for pair in GOAL_ANTONYMS for g in pair]
CONDITION: list[Group] = [
    ("diabetes",), ("high blood pressure", "hypertension"), ("gout",), ("acid reflux",),
    ("a cold",), ("IBS",), ("kidney disease",), ("anemia",),
]  # fmt: skip
ABILITY: list[Group] = [
    ("birds that", "fly"), ("mammals that", "swim"), ("animals that", "see in the dark"),
    ("plants that", "grow in shade"), ("fish that", "breathe air"), ("snakes that", "climb trees"),
    ("insects that", "sting"), ("dogs that", "be left alone all day"),
]  # fmt: skip
STIMULANT: list[Group] = [
    ("coffee",),
    ("caffeine",),
    ("energy drinks",),
    ("sugar",),
    ("a nap", "napping"),
]

# Polar slots: the groups are opposites, so substituting one gives an antonym near-miss.
INCREASE: list[Group] = [("increase", "boost", "raise"), ("decrease", "lower", "reduce")]
MORE: list[Group] = [("more",), ("less",)]
CHEAPER: list[Group] = [("cheaper", "less expensive"), ("more expensive", "pricier")]
BEFORE: list[Group] = [("before",), ("after",)]
SUP_SIZE: list[Group] = [("largest", "biggest"), ("smallest",)]
OPEN: list[Group] = [("open",), ("close",)]
BUY: list[Group] = [("buy",), ("sell",)]
SUN: list[Group] = [("sunrise",), ("sunset",)]
HOT: list[Group] = [("hottest", "warmest"), ("coldest", "coolest")]
BETTER: list[Group] = [("better",), ("worse",)]
PRONOUN_SUBJ: list[Group] = [("he",), ("she",)]
DIET_MOD: list[Group] = [
    ("",),
    ("vegan",),
    ("gluten-free",),
    ("low-carb",),
    ("sugar-free",),
    ("vegetarian",),
]
LEARN_MOD: list[Group] = [
    ("",),
    ("for free", "without paying"),
    ("as an adult",),
    ("in a month",),
    ("for kids",),
]
SCREENSHOT_MOD: list[Group] = [("",), ("of a scrolling page",), ("of one window",)]


@dataclass(frozen=True)
class Frame:
    """One intent. ``forms`` mean the same; ``negated`` mean its negation; ``kinds`` name the
    slots' pools; ``swap`` exchanges two slots (asymmetric unless ``symmetric``)."""

    name: str
    slots: dict[str, list[Group]]
    forms: tuple[str, ...]
    negated: tuple[str, ...] = ()
    swap: tuple[str, str] | None = None
    symmetric: bool = False
    substitute: dict[str, str] = field(default_factory=dict)  # slot -> category
    distinct: tuple[str, ...] = ()  # slots drawn without repetition among themselves
    pair_pool: list[tuple[Group, Group]] | None = None  # (a, b) drawn together (units)


F = Frame
FRAMES: tuple[Frame, ...] = (
    F(
        "convert_currency",
        {"a": CURRENCY, "b": CURRENCY},
        (
            "How do I convert {a} to {b}?",
            "What is the best way to convert {a} into {b}?",
            "How can I change {a} to {b}?",
            "Convert {a} to {b}",
            "How do I exchange {a} for {b}?",
            "{a} to {b} conversion: how do I do it?",
            "What's the easiest way to turn {a} into {b}?",
        ),
        swap=("a", "b"),
        substitute={"a": "entity", "b": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "amount_currency",
        {"n": AMOUNT, "a": CURRENCY, "b": CURRENCY},
        (
            "How much is {n} {a} in {b}?",
            "What is {n} {a} in {b}?",
            "Convert {n} {a} to {b}",
            "How many {b} do I get for {n} {a}?",
            "{n} {a} to {b}",
            "What does {n} {a} come to in {b}?",
        ),
        swap=("a", "b"),
        substitute={"n": "number", "a": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "flights",
        {"a": CITY, "b": CITY},
        (
            "Flights from {a} to {b}",
            "flights {a} to {b}",
            "Flights to {b} from {a}",
            "Find me flights from {a} to {b}",
            "I need a flight from {a} to {b}",
            "Show me flights leaving {a} for {b}",
            "Are there flights from {a} to {b}?",
            "Flights departing {a}, arriving in {b}",
        ),
        swap=("a", "b"),
        substitute={"a": "entity", "b": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "last_train",
        {"a": CITY, "b": CITY},
        (
            "When is the last train from {a} to {b}?",
            "What time does the last train leave {a} for {b}?",
            "Last train {a} to {b}: what time?",
            "How late is the final train from {a} to {b}?",
        ),
        swap=("a", "b"),
        substitute={"b": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "distance",
        {"a": CITY, "b": CITY},
        (
            "How far is {a} from {b}?",
            "What is the distance between {a} and {b}?",
            "How many miles is it between {a} and {b}?",
            "Distance from {a} to {b}",
        ),
        swap=("a", "b"),
        symmetric=True,
        substitute={"a": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "time_difference",
        {"a": TIME_GAP, "b": TIME_GAP},
        (
            "What is the time difference between {a} and {b}?",
            "How many hours apart are {a} and {b}?",
            "Time difference {a} and {b}",
        ),
        swap=("a", "b"),
        symmetric=True,
        substitute={"b": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "cheaper_living",
        {"a": CITY, "b": CITY, "c": CHEAPER},
        (
            "Is living in {a} {c} than living in {b}?",
            "Is it {c} to live in {a} than in {b}?",
            "Compared with {b}, is {a} {c} to live in?",
        ),
        swap=("a", "b"),
        substitute={"c": "antonym", "a": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "better_for",
        {"a": PROGRAMMING, "b": PROGRAMMING, "c": BETTER},
        (
            "Is {a} {c} than {b} for beginners?",
            "For a beginner, is {a} {c} than {b}?",
            "Would {a} be {c} than {b} as a first language?",
        ),
        swap=("a", "b"),
        substitute={"c": "antonym"},
        distinct=("a", "b"),
    ),
    F(
        "before_after",
        {"x": ROUTINE_ACT, "w": BEFORE, "y": ROUTINE_EVENT},
        (
            "Should I {x} {w} {y}?",
            "Is it better to {x} {w} {y}?",
            "Is it a good idea to {x} {w} {y}?",
            "Do you recommend that I {x} {w} {y}?",
        ),
        substitute={"w": "antonym", "x": "entity", "y": "entity"},
    ),
    F(
        "drug_with",
        {"a": DRUG, "b": DRUG},
        (
            "Is it safe to take {a} with {b}?",
            "Can I take {a} together with {b}?",
            "Is it okay to combine {a} and {b}?",
            "Can {a} be taken with {b}?",
            "Is taking {a} alongside {b} safe?",
        ),
        negated=(
            "Is it safe to take {a} without {b}?",
            "Can I take {a} but not {b}?",
            "Is it okay to take {a} without also taking {b}?",
            "Can {a} be taken without {b}?",
        ),
        substitute={"b": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "side_effect",
        {"a": DRUG, "e": EFFECT},
        (
            "Does {a} cause {e}?",
            "Can {a} cause {e}?",
            "Is {e} a side effect of {a}?",
            "Can taking {a} lead to {e}?",
        ),
        substitute={"a": "entity", "e": "entity"},
    ),
    F(
        "pets_food",
        {"p": ANIMAL, "f": FOOD},
        (
            "Can {p} eat {f}?",
            "Is it safe for {p} to eat {f}?",
            "Are {p} allowed to eat {f}?",
            "Is {f} okay for {p}?",
            "Can I feed {f} to my {p}?",
        ),
        substitute={"p": "entity", "f": "entity"},
    ),
    F(
        "foods_condition",
        {"c": CONDITION},
        (
            "What foods should I eat with {c}?",
            "Which foods are good to eat when you have {c}?",
            "What should I eat if I have {c}?",
            "What is good to eat with {c}?",
        ),
        negated=(
            "What foods should I not eat with {c}?",
            "Which foods are not good to eat when you have {c}?",
            "What shouldn't I eat if I have {c}?",
            "What is bad to eat with {c}? What should I not eat?",
        ),
        substitute={"c": "entity"},
    ),
    F(
        "which_can",
        {"a": ABILITY},
        (
            "Which {a0} can {a1}?",
            "What are some {a0} can {a1}?",
            "Name {a0} are able to {a1}",
        ),
        negated=(
            "Which {a0} cannot {a1}?",
            "What are some {a0} can't {a1}?",
            "Name {a0} are not able to {a1}",
        ),
        substitute={"a": "entity"},
    ),
    F(
        "awake_without",
        {"x": STIMULANT},
        (
            "How can I stay awake without {x}?",
            "What are ways to stay awake without {x}?",
            "How do I keep from falling asleep without {x}?",
        ),
        negated=(
            "How can I stay awake with {x}?",
            "What are ways to stay awake using {x}?",
            "How do I keep from falling asleep with the help of {x}?",
        ),
        substitute={"x": "entity"},
    ),
    F(
        "capital",
        {"c": COUNTRY},
        (
            "What is the capital of {c}?",
            "What's the capital city of {c}?",
            "Which city is the capital of {c}?",
            "Name the capital of {c}",
            "capital of {c}?",
        ),
        substitute={"c": "entity"},
    ),
    F(
        "official_language",
        {"c": COUNTRY},
        (
            "What language do they speak in {c}?",
            "What is the official language of {c}?",
            "Which language is spoken in {c}?",
            "What do people in {c} speak?",
        ),
        substitute={"c": "entity"},
    ),
    F(
        "weather_day",
        {"c": CITY, "d": WEEKDAY},
        (
            "What's the weather in {c} on {d}?",
            "Weather forecast for {c} on {d}",
            "How will the weather be in {c} this {d}?",
            "What is the forecast for {d} in {c}?",
        ),
        substitute={"c": "entity", "d": "number"},
    ),
    F(
        "units",
        {"n": SMALL_NUMBER},
        (
            "How many {v} are in {n} {u}?",
            "Convert {n} {u} to {v}",
            "What is {n} {u} in {v}?",
            "{n} {u} equals how many {v}?",
            "How many {v} is {n} {u}?",
        ),
        swap=("u", "v"),
        substitute={"n": "number"},
        pair_pool=[((u,), (v,)) for u, v in UNIT_PAIRS],
    ),
    F(
        "event_winner",
        {"e": EVENT, "y": YEAR},
        (
            "Who won {e} in {y}?",
            "Which team won {e} in {y}?",
            "Who was the winner of {e} in {y}?",
            "{e} {y}: who won?",
            "Who took the title at {e} in {y}?",
        ),
        substitute={"y": "number", "e": "entity"},
    ),
    F(
        "tax_deadline",
        {"y": YEAR, "m": MONTH},
        (
            "When is the tax filing deadline in {m} {y}?",
            "What is the deadline to file taxes in {m} {y}?",
            "By what date in {m} {y} must I file my taxes?",
        ),
        substitute={"y": "number", "m": "number"},
    ),
    F(
        "prime",
        {"n": PRIME_CANDIDATE},
        (
            "Is {n} a prime number?",
            "Is {n} prime?",
            "Is the number {n} a prime?",
            "Can {n} only be divided by 1 and itself?",
        ),
        substitute={"n": "number"},
    ),
    F(
        "driving_age",
        {"n": AGE, "c": COUNTRY},
        (
            "Can a {n}-year-old drive in {c}?",
            "Is it legal to drive at {n} in {c}?",
            "At {n}, am I allowed to drive in {c}?",
            "Can you get a driving licence at {n} in {c}?",
        ),
        substitute={"n": "number", "c": "entity"},
    ),
    F(
        "code_task",
        {"l": PROGRAMMING, "t": TASK},
        (
            "How do I {t} in {l}?",
            "What's the way to {t} using {l}?",
            "How can I {t} with {l}?",
            "In {l}, how do you {t}?",
            "Best way to {t} in {l}",
        ),
        substitute={"l": "entity", "t": "entity"},
    ),
    F(
        "port_code",
        {"a": PROGRAMMING, "b": PROGRAMMING},
        (
            "How do I convert {a} code to {b}?",
            "What's the best way to port code from {a} to {b}?",
            "How can I translate a {a} program into {b}?",
            "Is there a tool to turn {a} code into {b}?",
        ),
        swap=("a", "b"),
        substitute={"b": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "translate_word",
        {"w": WORD, "l": LANGUAGE},
        (
            "How do you say {w} in {l}?",
            "What is the {l} word for {w}?",
            "Translate {w} into {l}",
            "How would I say {w} in {l}?",
        ),
        substitute={"w": "entity", "l": "entity"},
    ),
    F(
        "translate_between",
        {"a": LANGUAGE, "b": LANGUAGE},
        (
            "What is the best app to translate from {a} to {b}?",
            "Which app translates {a} into {b} best?",
            "Best translator app for {a} to {b}",
        ),
        swap=("a", "b"),
        substitute={"a": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "likes_me",
        {"s": PRONOUN_SUBJ},
        (
            "How do I know if {s} likes me?",
            "What are the signs that {s} likes me?",
            "How can I tell whether {s} is into me?",
            "How do I tell if {s} has feelings for me?",
        ),
        negated=(
            "How do I know if {s} doesn't like me?",
            "What are the signs that {s} is not into me?",
        ),
        substitute={"s": "pronoun"},
    ),
    F(
        "pronoun_call",
        {"s": PRONOUN_SUBJ, "x": PERSON},
        (
            "Why did {s} stop calling {x}?",
            "What made {s} stop calling {x}?",
            "Why has {s} stopped phoning {x}?",
        ),
        substitute={"s": "pronoun", "x": "entity"},
    ),
    F(
        "beat_final",
        {"x": TEAM, "y": TEAM, "r": YEAR},
        (
            "Did {x} beat {y} in the {r} final?",
            "Was {y} beaten by {x} in the {r} final?",
            "In the {r} final, did {x} defeat {y}?",
            "Did {y} lose to {x} in the {r} final?",
        ),
        swap=("x", "y"),
        substitute={"r": "number"},
        distinct=("x", "y"),
    ),
    F(
        "acquired",
        {"x": COMPANY, "y": COMPANY},
        (
            "Did {x} acquire {y}?",
            "Was {y} acquired by {x}?",
            "Has {x} bought {y}?",
            "Was {y} bought by {x}?",
            "Is it true that {x} purchased {y}?",
        ),
        swap=("x", "y"),
        substitute={"y": "entity"},
        distinct=("x", "y"),
    ),
    F(
        "sued",
        {"x": COMPANY, "y": COMPANY},
        (
            "Why did {x} sue {y}?",
            "Why was {y} sued by {x}?",
            "What was {x}'s lawsuit against {y} about?",
        ),
        swap=("x", "y"),
        distinct=("x", "y"),
    ),
    F(
        "hire",
        {"x": PERSON, "y": PERSON},
        (
            "Did {x} hire {y}?",
            "Was {y} hired by {x}?",
            "Is it true that {x} gave {y} the job?",
        ),
        swap=("x", "y"),
        distinct=("x", "y"),
    ),
    F(
        "increase_metric",
        {"i": INCREASE, "m": METRIC},
        (
            "How can I {i} my {m}?",
            "What's the best way to {i} my {m}?",
            "Ways to {i} my {m}",
            "How do I {i} my {m} quickly?",
            "Tips to {i} my {m}",
        ),
        substitute={"i": "antonym", "m": "entity"},
    ),
    F(
        "which_more",
        {"n": NUTRIENT, "a": FOOD, "b": FOOD, "w": MORE},
        (
            "Which has {w} {n}, {a} or {b}?",
            "Does {a} or {b} have {w} {n}?",
            "Which contains {w} {n}: {a} or {b}?",
            "Which has {w} {n}, {b} or {a}?",
        ),
        substitute={"w": "antonym", "n": "entity", "a": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "superlative",
        {"s": SUP_SIZE, "t": SUPERLATIVE_THING},
        (
            "What is the {s} {t}?",
            "Which {t} is the {s}?",
            "What's the {s} {t} in the world?",
            "Name the {s} {t}",
        ),
        substitute={"s": "antonym", "t": "entity"},
    ),
    F(
        "hottest_month",
        {"h": HOT, "c": CITY},
        (
            "What is the {h} month in {c}?",
            "Which month is the {h} in {c}?",
            "In {c}, which month is usually the {h}?",
        ),
        substitute={"h": "antonym", "c": "entity"},
    ),
    F(
        "opening_time",
        {"o": OPEN, "p": PLACE, "d": WEEKDAY},
        (
            "What time does {p} {o} on {d}?",
            "When does {p} {o} on {d}?",
            "{p} hours: when do they {o} on {d}?",
        ),
        substitute={"o": "antonym", "d": "number", "p": "entity"},
    ),
    F(
        "buy_sell",
        {"b": BUY, "a": ASSET},
        (
            "Is now a good time to {b} {a}?",
            "Should I {b} {a} now?",
            "Is this the right moment to {b} {a}?",
            "Would it be smart to {b} {a} right now?",
        ),
        substitute={"b": "antonym", "a": "entity"},
    ),
    F(
        "sun_time",
        {"s": SUN, "c": CITY, "m": MONTH},
        (
            "What time is {s} in {c} in {m}?",
            "When is {s} in {c} during {m}?",
            "In {m}, what time is {s} in {c}?",
        ),
        substitute={"s": "antonym", "m": "number", "c": "entity"},
    ),
    F(
        "transfer_files",
        {"a": TRANSFER_ENDPOINT, "b": TRANSFER_ENDPOINT},
        (
            "How do I transfer photos from {a} to {b}?",
            "How can I move my photos from {a} to {b}?",
            "What's the easiest way to copy photos from {a} to {b}?",
            "How to get photos off {a} onto {b}?",
        ),
        swap=("a", "b"),
        substitute={"b": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "transfer_money",
        {"a": ACCOUNT_KIND, "b": ACCOUNT_KIND},
        (
            "How do I transfer money from {a} to {b}?",
            "How can I move money from {a} to {b}?",
            "What's the way to send funds from {a} to {b}?",
        ),
        swap=("a", "b"),
        substitute={"a": "entity"},
        distinct=("a", "b"),
    ),
    F(
        "reset_credential",
        {"k": CREDENTIAL, "s": ACCOUNT},
        (
            "How do I reset my {s} {k}?",
            "I forgot my {s} {k}, how can I change it?",
            "What should I do if I can't remember my {s} {k}?",
            "How can I recover my {s} {k}?",
            "Reset {s} {k}",
            "I lost my {s} {k}. How do I get a new one?",
        ),
        substitute={"k": "entity", "s": "entity"},
    ),
    F(
        "goal_fast",
        {"g": GOALS},
        (
            "How can I {g} fast?",
            "What is the quickest way to {g}?",
            "What's the fastest way to {g}?",
            "How do I {g} quickly?",
            "Tips to {g} in a short time",
        ),
        substitute={"g": "antonym"},
    ),
    F(
        "screenshot",
        {"d": DEVICE, "m": SCREENSHOT_MOD},
        (
            "How do I take a screenshot{m} on {d}?",
            "How can I capture a screenshot{m} on {d}?",
            "What's the shortcut for a screenshot{m} on {d}?",
            "Taking a screenshot{m} on {d}: how?",
        ),
        substitute={"d": "entity", "m": "modifier"},
    ),
    F(
        "diet_recipe",
        {"m": DIET_MOD, "d": DISH},
        (
            "What is a good{m} recipe for {d}?",
            "Can you suggest a{m} {d} recipe?",
            "How do I make{m} {d}?",
            "Give me an easy{m} {d} recipe",
        ),
        substitute={"m": "modifier", "d": "entity"},
    ),
    F(
        "learn_language",
        {"l": LANGUAGE, "m": LEARN_MOD},
        (
            "How can I learn {l}{m}?",
            "What's the best way to learn {l}{m}?",
            "How do I go about learning {l}{m}?",
            "Tips for learning {l}{m}",
        ),
        substitute={"m": "modifier", "l": "entity"},
    ),
)

PREAMBLES = (
    "Quick question: ", "Hi, ", "Hello! ", "Hey there, ", "Sorry to bother you, but ",
    "I was wondering: ", "Can you help? ", "Question for you: ", "Just curious, ",
    "Please help: ", "Hi team, ", "Good morning! ",
)  # fmt: skip
SUFFIXES = (" Thanks!", " Thanks in advance.", " Any ideas?", " Thank you.")


@dataclass(frozen=True)
class GeneratedPair:
    first: str
    second: str
    label: bool
    category: str  # "paraphrase" | "swap" | "negation" | "antonym" | "number" | ...
    frame: str


Slots = dict[str, Group]


def _pools(frame: Frame) -> dict[str, list[Group]]:
    return frame.slots


def _draw(frame: Frame, rng: random.Random) -> Slots:
    pools = _pools(frame)
    slots: Slots = {}
    if frame.pair_pool is not None:
        u, v = rng.choice(frame.pair_pool)
        slots["u"], slots["v"] = (u, v) if rng.random() < 0.5 else (v, u)
    for name in sorted(pools):
        taken = (
            {slots[o] for o in frame.distinct if o in slots} if name in frame.distinct else set()
        )
        slots[name] = rng.choice([g for g in pools[name] if g not in taken])
    return slots


def _render(form: str, slots: Slots, rng: random.Random) -> str:
    values: dict[str, str] = {}
    for name, group in slots.items():
        if "{" + name + "0}" in form:  # a compound value: its parts, not synonyms
            values.update({f"{name}{i}": part for i, part in enumerate(group)})
            continue
        surface = rng.choice(group)
        glued = "{" + name + "}" in form and _glued(form, name)
        values[name] = f" {surface}" if surface and glued else surface
    text = form.format(**values)
    return text[0].upper() + text[1:] if text else text


def _glued(form: str, name: str) -> bool:
    """A slot written with no space before it (``good{m} recipe``): an optional modifier."""
    at = form.index("{" + name + "}")
    return at > 0 and form[at - 1] != " "


def _dress(text: str, rng: random.Random) -> str:
    """Meaning-preserving noise: a preamble, a closing, another case, no question mark."""
    roll = rng.random()
    if roll < 0.35:
        head = rng.choice(PREAMBLES)
        lowered = text[0].lower() + text[1:] if text[1:2].islower() else text
        text = head + lowered
    elif roll < 0.5:
        text = text + rng.choice(SUFFIXES)
    elif roll < 0.6:
        text = text.lower()
    elif roll < 0.7 and text.endswith("?"):
        text = text[:-1]
    return text


def _negative(frame: Frame, slots: Slots, rng: random.Random) -> tuple[Slots, bool, str] | None:
    """A near-miss of the instance: (slots, negated?, category), or None if none applies."""
    moves: list[str] = []
    if frame.swap is not None and not frame.symmetric:
        moves.append("swap")
    if frame.negated:
        moves.append("negation")
    moves.extend(f"sub:{slot}" for slot in frame.substitute)
    if not moves:
        return None
    # one category at a time, then one of its moves: entity slots would otherwise dominate
    by_category: dict[str, list[str]] = {}
    for move in moves:
        kind = frame.substitute[move[4:]] if move.startswith("sub:") else move
        by_category.setdefault(kind, []).append(move)
    move = rng.choice(by_category[rng.choice(sorted(by_category))])
    if move == "swap":
        assert frame.swap is not None
        a, b = frame.swap
        if slots[a] == slots[b]:
            return None
        return {**slots, a: slots[b], b: slots[a]}, False, "swap"
    if move == "negation":
        return dict(slots), True, "negation"
    slot = move.split(":", 1)[1]
    pool = _pools(frame)[slot]
    if frame.name == "goal_fast":  # the antonym of the drawn goal, not any other goal
        pool = [pair[1] if slots[slot] == pair[0] else pair[0] for pair in GOAL_ANTONYMS
                if slots[slot] in pair]  # fmt: skip
    taken = {slots[o] for o in frame.distinct if o != slot}
    options = [g for g in pool if g != slots[slot] and g not in taken]
    if not options:
        return None
    return {**slots, slot: rng.choice(options)}, False, frame.substitute[slot]


def _instance(frame: Frame, rng: random.Random) -> list[GeneratedPair]:
    slots = _draw(frame, rng)
    base_negated = bool(frame.negated) and rng.random() < 0.3  # negation "out" as well as "in"
    forms = frame.negated if base_negated else frame.forms
    first_form = rng.choice(forms)
    first = _render(first_form, slots, rng)
    if rng.random() < 0.2:
        first = _dress(first, rng)
    out: list[GeneratedPair] = []
    # positive: another form (or the same one dressed), the same meaning
    second_form = rng.choice(forms) if rng.random() < 0.8 else first_form
    pos_slots = slots
    if frame.swap is not None and frame.symmetric and rng.random() < 0.5:
        a, b = frame.swap
        pos_slots = {**slots, a: slots[b], b: slots[a]}
    second = _dress(_render(second_form, pos_slots, rng), rng)
    if second != first:
        category = "symmetric_swap" if pos_slots is not slots else "paraphrase"
        out.append(GeneratedPair(first, second, True, category, frame.name))
    near = _negative(frame, slots, rng)
    if near is not None:
        neg_slots, flip, category = near
        pool = (frame.forms if base_negated else frame.negated) if flip else forms
        form = first_form if (not flip and rng.random() < 0.5) else rng.choice(pool)
        text = _render(form, neg_slots, rng)
        if rng.random() < 0.3:
            text = _dress(text, rng)
        out.append(GeneratedPair(first, text, False, category, frame.name))
    return out


def _probe(text: str) -> bool:
    return " ".join(text.casefold().split()) in PROBES


def generate(seed: int = SEED, per_frame: int = PER_FRAME) -> list[GeneratedPair]:
    """Every frame ``per_frame`` times; duplicates and the issue's probes dropped."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    out: list[GeneratedPair] = []
    for frame in FRAMES:
        for _ in range(per_frame):
            for pair in _instance(frame, rng):
                key = (pair.first.casefold(), pair.second.casefold())
                if key in seen or _probe(pair.first) or _probe(pair.second):
                    continue
                seen.add(key)
                out.append(pair)
    return out


def write_csv(pairs: Sequence[GeneratedPair], path: Path) -> None:
    """``text_a,text_b,label,category,frame``: the harness's pairs layout plus two columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text_a", "text_b", "label", "category", "frame"])
        for p in pairs:
            writer.writerow([p.first, p.second, int(p.label), p.category, p.frame])
