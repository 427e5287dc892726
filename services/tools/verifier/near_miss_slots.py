"""The slots of the generated pairs (``near_misses``): the values a slot takes, each a list of
synonym groups (one meaning, its surfaces: "USD", "US dollars"), and ``Frame``, an intent with
slots.

Standard library only, as ``near_misses``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
