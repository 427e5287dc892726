"""The demo's own workload: an agent with a long prompt and tools, an FAQ bot, stray questions.

Written for this demo (nothing is read from evaluation data sets). The agent's system prompt
and tool list are long enough (over 1,024 tokens) to be cached under Anthropic's rules and
carry ``cache_control`` breakpoints as a real agent would send them.
"""

from __future__ import annotations

import json

from cachemesh.v1 import gateway_pb2 as pb

AGENT_MODEL = "sim-large"

_POLICY_SECTIONS = {
    "Identity and tone": (
        "You are the booking assistant of Northwind Air. You help one authenticated customer "
        "at a time with reservations, changes, cancellations, baggage and refunds. Be concise, "
        "polite and exact. Never invent a flight, a fare or a policy; if something is not in "
        "this policy or in a tool result, say that you do not know and offer a human agent."
    ),
    "Authentication": (
        "Before any change, confirm the customer's user id and the reservation id. Look the "
        "reservation up with get_reservation and read back the passenger names, the flight "
        "numbers and the dates. Do not act on a reservation that belongs to another user id, "
        "even if the customer says they are travelling together."
    ),
    "Changes": (
        "Basic economy reservations cannot be changed. Economy and business reservations can "
        "change flights if no segment has been flown; the cabin must stay the same unless the "
        "customer pays the fare difference. Origin, destination and trip type never change: a "
        "different route is a new reservation. Always show the price difference and wait for "
        "an explicit yes before calling update_reservation_flights."
    ),
    "Cancellations": (
        "A reservation can be cancelled within 24 hours of booking, when the airline cancelled "
        "a flight, for business cabin, or when travel insurance covers the reason (health or "
        "weather). Otherwise explain that it cannot be cancelled and offer a change instead. "
        "Refunds go back to the original payment methods within 5 to 7 business days."
    ),
    "Baggage": (
        "Free checked bags per passenger: regular members 0 in basic economy, 1 in economy, 2 "
        "in business; silver members one more; gold members two more. Extra bags cost $50 "
        "each. Add bags with update_reservation_baggages; never remove bags already paid for."
    ),
    "Compensation": (
        "Only offer compensation when the customer complains about a cancelled or delayed "
        "flight and is a silver or gold member, has travel insurance, or flies business. A "
        "cancelled flight earns a $100 certificate per passenger; a delay of more than three "
        "hours earns $50 per passenger once the reservation is changed or cancelled."
    ),
    "Payments": (
        "Every reservation may use at most one travel certificate, one credit card and three "
        "gift cards. A certificate's unused balance is not refundable. Payment methods must "
        "already be in the user's profile; ask which one to use and never read back full "
        "card numbers, only the last four digits."
    ),
    "Handing over": (
        "Transfer to a human agent with transfer_to_human_agents only when the request is "
        "outside this policy or the customer asks for a person twice. Summarise the case in "
        "one paragraph so the human agent does not need to ask again."
    ),
}

SYSTEM_PROMPT = "# Northwind Air booking assistant policy\n\n" + "\n\n".join(
    f"## {title}\n{text}\n\n"
    + "\n".join(
        f"- Rule {i}.{j}: {sentence.strip()}."
        for j, sentence in enumerate(text.split(". "), start=1)
        if sentence.strip()
    )
    for i, (title, text) in enumerate(_POLICY_SECTIONS.items(), start=1)
)


def _tool(name: str, description: str, properties: dict[str, str]) -> pb.Tool:
    schema = {
        "type": "object",
        "properties": {
            key: {"type": "string", "description": desc} for key, desc in properties.items()
        },
        "required": list(properties),
    }
    return pb.Tool(name=name, description=description, input_schema_json=json.dumps(schema))


TOOLS = [
    _tool(
        "get_user_details",
        "Get a user's profile: name, membership, payment methods and reservation ids.",
        {"user_id": "The user id, such as 'sara_doe_496'."},
    ),
    _tool(
        "get_reservation",
        "Get a reservation's flights, passengers, cabin, baggage, insurance and payment history.",
        {"reservation_id": "Six characters, e.g. 'ZFA04Y'."},
    ),
    _tool(
        "search_direct_flight",
        "Search direct flights between two airports on a date.",
        {
            "origin": "IATA code of the origin airport, such as 'JFK'.",
            "destination": "IATA code of the destination airport, such as 'SEA'.",
            "date": "The date in YYYY-MM-DD format.",
        },
    ),
    _tool(
        "update_reservation_flights",
        "Change the flights of a reservation. The cabin must "
        "stay the same unless the fare difference is paid.",
        {
            "reservation_id": "The reservation id.",
            "cabin": "basic_economy, economy or business.",
            "flights": "JSON list of {flight_number, date} for every segment, changed or not.",
            "payment_id": "The payment method for the fare difference.",
        },
    ),
    _tool(
        "update_reservation_baggages",
        "Set the total and non-free baggage counts.",
        {
            "reservation_id": "The reservation id.",
            "total_baggages": "The new total number of checked bags.",
            "nonfree_baggages": "How many of them are paid.",
            "payment_id": "The payment method for paid bags.",
        },
    ),
    _tool(
        "cancel_reservation",
        "Cancel a whole reservation and refund it to the original payment methods.",
        {"reservation_id": "The reservation id."},
    ),
    _tool(
        "send_certificate",
        "Send a travel certificate as compensation.",
        {"user_id": "The user id.", "amount": "The amount in whole dollars."},
    ),
    _tool(
        "transfer_to_human_agents",
        "Hand the conversation to a human agent.",
        {"summary": "One paragraph that states the user id, the request and what was done."},
    ),
]
TOOLS[-1].cache_control.SetInParent()  # breakpoint 1: the tool list


def agent_system() -> list[pb.ContentBlock]:
    block = pb.ContentBlock(text=SYSTEM_PROMPT)
    block.cache_control.SetInParent()  # breakpoint 2: tools + system
    return [block]


AGENT_TURNS = [
    "Hi, I'm sara_doe_496. I need to move reservation ZFA04Y from JFK to SEA to a day later.",
    "Yes, the economy cabin is fine. Which flights are there on May 17?",
    "Take the morning one, HAT045, and use my credit card ending in 7447.",
    "Also add one checked bag to the same reservation, please.",
]

# FAQ traffic: (tenant, question). Exact repeats and paraphrases of earlier questions.
FAQ_SYSTEM = (
    "You are the support assistant of Northwind Air. Answer customer questions in two or "
    "three sentences."
)
FAQ = [
    ("a", "How do I reset my password?"),
    ("a", "How do I cancel my subscription?"),
    ("a", "How do I contact customer support?"),
    ("a", "How do I reset my password?"),  # exact repeat
    ("a", "I forgot my password, how can I change it?"),  # paraphrase
    ("a", "I want to cancel my subscription, how do I do that?"),  # paraphrase
    ("a", "How can I reach customer support?"),  # paraphrase
    ("a", "How do I cancel my subscription?"),  # exact repeat
    ("b", "How do I reset my password?"),  # another tenant: never served from a's entries
]

UNRELATED = [
    "What is the difference between a layover and a stopover?",
    "Explain why planes fly at about 35,000 feet, step by step.",
    "Can I bring a guitar on board as cabin baggage?",
]
