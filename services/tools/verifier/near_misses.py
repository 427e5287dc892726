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
from dataclasses import dataclass
from pathlib import Path

from services.tools.verifier.near_miss_facts import FACT_FRAMES
from services.tools.verifier.near_miss_slots import GOAL_ANTONYMS, Frame, Group
from services.tools.verifier.near_miss_tasks import TASK_FRAMES

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

# every frame, in the order the generator draws them (the seed's output depends on it)
FRAMES: tuple[Frame, ...] = (*FACT_FRAMES, *TASK_FRAMES)

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
