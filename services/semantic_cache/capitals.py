"""Function words written in capitals: names, not the words.

"What does IT stand for?" asks about information technology, "what does it stand for?" about
a pronoun's referent; "US" is the United States, "WHO" the World Health Organization, "AM"
the morning, "OR" an operating room. The embedder and the cross-encoder lowercase both, and
the exact path folded them as casual typing (a word in capitals against a question written
all in lowercase): each was served the other's answer at similarity 1.0. A function word
(below) written in capitals, two letters or more, in a text that has lowercase letters (its
capitals are chosen; one written all in capitals shouts) is read as a name: a text naming it
is not served for one that has only the word, nor the other way round.
"""

from __future__ import annotations

import re

from services.semantic_cache.words import LETTERS

# English function words (pronouns, determiners, prepositions, conjunctions, auxiliaries):
# closed classes whose capital forms are names, never a proper noun typed in lowercase
FUNCTION_WORDS = frozenset(
    re.findall(
        r"\S+",
        "a an the this that these those it its he him his she her we us our you your they them "
        "their me my mine i who whom whose what which when where why how of to in on at by for "
        "from with as into onto upon off out up down over under about after before since till "
        "until than and or but nor so yet if is am are was were be been being do does did doing "
        "has have had can could will would shall should may might must no not any all some each",
    )
)
NAME = "name"  # written in capitals somewhere in the text
WORD = "word"  # only ever written otherwise


def function_word_forms(text: str) -> dict[str, list[str]]:
    """Per function word of ``text`` (lowercased): ``[NAME]`` when the text writes it in
    capitals somewhere (and has lowercase letters), else ``[WORD]``."""
    chosen = any(c.islower() for c in text)
    forms: dict[str, list[str]] = {}
    for match in LETTERS.finditer(text):
        word = match.group()
        key = word.lower()
        if key not in FUNCTION_WORDS:
            continue
        named = chosen and len(word) >= 2 and word.isupper()
        if named or key not in forms:
            forms[key] = [NAME if named else WORD]
    return forms
