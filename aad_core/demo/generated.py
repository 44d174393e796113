"""Project-generated support tickets for the JSON-extraction node ``extract`` (no public data fits it).

Each ticket is assembled from templates with a seeded :class:`random.Random`: a product, an issue
type, an urgency cue and an order number are drawn and a sentence is built around them. The gold
answer is the JSON object a careful teacher extracts: the order number and the product as written
(:func:`ticket_answer_json`); the category and priority stay on :class:`Ticket` for other uses.
The same seed always gives the same tickets.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

PRODUCTS = ("debit card", "credit card", "mobile app", "savings account", "online banking", "travel card")
CATEGORIES = {
    "billing": ("I was charged twice for {p} order #{o}", "there is a fee on my {p} I don't understand (ref #{o})",
                "refund for order #{o} on my {p} never arrived"),
    "technical": ("the {p} keeps crashing when I open it (ticket #{o})", "I can't log in to the {p}, case #{o}",
                  "the {p} shows an error code since yesterday, order #{o}"),
    "account": ("please update the address on my {p}, reference #{o}", "I want to close my {p} (ref #{o})",
                "how do I add my partner to the {p}? case #{o}"),
    "fraud": ("there are payments on my {p} I did not make, ref #{o}", "someone used my {p} abroad, case #{o}",
              "I think my {p} was stolen, order #{o}"),
}
URGENCY = {
    "high": ("This is urgent!", "Please help ASAP.", "I need this fixed today."),
    "medium": ("Could you look into it this week?", "Please get back to me soon.", "I'd appreciate an answer this week."),
    "low": ("No rush.", "Whenever you have time.", "Just letting you know."),
}
OPENERS = ("Hi,", "Hello team,", "Good morning,", "Hey,", "Dear support,", "")


@dataclass
class Ticket:
    text: str
    answer: dict[str, str]


def generate_tickets(n: int, seed: int) -> list[Ticket]:
    rng = random.Random(f"aad-demo-tickets-{seed}")
    out = []
    for _ in range(n):
        category = rng.choice(sorted(CATEGORIES))
        priority = rng.choice(sorted(URGENCY))
        if category == "fraud":
            priority = "high"
        product = rng.choice(PRODUCTS)
        order = f"{rng.randint(10000, 99999)}"
        body = rng.choice(CATEGORIES[category]).format(p=product, o=order)
        text = " ".join(x for x in (rng.choice(OPENERS), body[0].upper() + body[1:] + ".", rng.choice(URGENCY[priority])) if x)
        out.append(Ticket(text=text, answer={"category": category, "priority": priority, "order_id": order, "product": product}))
    return out


def ticket_answer_json(ticket: Ticket) -> str:
    """The ``extract`` node's gold answer: ``{"order_id": ..., "product": ...}``."""
    fields = {k: ticket.answer[k] for k in ("order_id", "product")}
    return json.dumps(fields, separators=(", ", ": "))
