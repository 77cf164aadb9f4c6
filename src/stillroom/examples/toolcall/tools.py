"""Deterministic tools for the multi-step slice: look something up, then act on what came back.

Each scenario pairs a lookup tool with an action tool whose argument is a value only the lookup
returns (an order id, an email address, a flight id). The tools are plain Python functions: the same
arguments always give the same result (identifiers derive from a hash of the call), so a trace can be
replayed, verified step by step and scored without any service.
"""

from __future__ import annotations

import hashlib
import json
import random

from stillroom.examples.toolcall import values as arg_values


def _code(prefix: str, *parts) -> str:
    digest = hashlib.sha256(json.dumps([prefix, *parts], ensure_ascii=False).encode()).hexdigest()
    return f"{prefix}-{int(digest[:8], 16) % 9000 + 1000}"


def _norm(value) -> str:
    return " ".join(str(value).split()).casefold()


def find_order(customer: str) -> dict:
    return {"order_id": _code("ORD", _norm(customer)), "status": "processing"}


def cancel_order(order_id: str) -> dict:
    return {"cancelled": True, "refund_id": _code("RF", order_id.upper())}


def find_contact(name: str) -> dict:
    return {"email": _norm(name).replace(" ", ".") + "@example.com"}


def send_message(to: str, text: str) -> dict:
    return {"sent": True, "message_id": _code("MSG", _norm(to), _norm(text))}


def next_flight(origin: str, destination: str) -> dict:
    return {"flight_id": _code("FL", _norm(origin), _norm(destination)), "departs": "09:40"}


def book_flight(flight_id: str) -> dict:
    return {"booked": True, "booking_ref": _code("BK", flight_id.upper())}


def find_restaurant(cuisine: str, city: str) -> dict:
    return {"restaurant_id": _code("R", _norm(cuisine), _norm(city)), "rating": 4.5}


def book_table(restaurant_id: str, people: int) -> dict:
    return {"confirmed": True, "reservation": _code("RS", restaurant_id.upper(), int(people))}


def lookup_product(name: str) -> dict:
    return {"sku": _code("SKU", _norm(name)), "in_stock": True}


def add_to_cart(sku: str, quantity: int) -> dict:
    return {"added": True, "cart_id": _code("CART", sku.upper(), int(quantity))}


def _tool(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": props, "required": required}}}  # fmt: skip


S, I = {"type": "string"}, {"type": "integer"}
FUNCTIONS = {
    "find_order": find_order, "cancel_order": cancel_order, "find_contact": find_contact, "send_message": send_message,
    "next_flight": next_flight, "book_flight": book_flight, "find_restaurant": find_restaurant,
    "book_table": book_table, "lookup_product": lookup_product, "add_to_cart": add_to_cart,
}  # fmt: skip
SPECS = {
    "find_order": _tool("find_order", "Find a customer's latest order.", {"customer": S}, ["customer"]),
    "cancel_order": _tool("cancel_order", "Cancel an order by its id.", {"order_id": S}, ["order_id"]),
    "find_contact": _tool("find_contact", "Look up a contact's email address.", {"name": S}, ["name"]),
    "send_message": _tool("send_message", "Send a message to an email address.", {"to": S, "text": S}, ["to", "text"]),
    "next_flight": _tool("next_flight", "Find the next flight between two cities.", {"origin": S, "destination": S}, ["origin", "destination"]),
    "book_flight": _tool("book_flight", "Book a flight by its id.", {"flight_id": S}, ["flight_id"]),
    "find_restaurant": _tool("find_restaurant", "Find a restaurant by cuisine in a city.", {"cuisine": S, "city": S}, ["cuisine", "city"]),
    "book_table": _tool("book_table", "Book a table at a restaurant by its id.", {"restaurant_id": S, "people": I}, ["restaurant_id", "people"]),
    "lookup_product": _tool("lookup_product", "Find a product's SKU by name.", {"name": S}, ["name"]),
    "add_to_cart": _tool("add_to_cart", "Add a product to the cart by SKU.", {"sku": S, "quantity": I}, ["sku", "quantity"]),
}  # fmt: skip

# lookup -> act. `link`: the act argument filled from the lookup result; `result`: the act result's
# field the final answer must quote; `final`: the reference answer; `draw`: placeholders drawn from the shared
# banks (see scenario_value) rather than from `values`.
SCENARIOS = [
    {"lookup": "find_order", "act": "cancel_order", "link": {"order_id": "order_id"}, "result": "refund_id",
     "templates": ["Find the latest order for {customer} and cancel it.", "Please cancel {customer}'s most recent order; look it up first."],
     "values": {}, "draw": {"customer": "person"},
     "final": "Done: order {order_id} is cancelled, refund {refund_id}."},
    {"lookup": "find_contact", "act": "send_message", "link": {"to": "email"}, "result": "message_id",
     "templates": ["Look up {name}'s email and send them: {text}", "Send {name} the message \"{text}\" - find their address first."],
     "values": {"text": ["Running 10 minutes late", "Lunch at noon?", "The report is ready", "Call me when you land", "Meeting moved to 3pm",
                         "Happy birthday!", "Can you review the draft?", "Dinner is on me tonight"]}, "draw": {"name": "person"},
     "final": "Sent to {to} (message {message_id})."},
    {"lookup": "next_flight", "act": "book_flight", "link": {"flight_id": "flight_id"}, "result": "booking_ref",
     "templates": ["Find the next flight from {origin} to {destination} and book it.", "Book me on the next {origin} to {destination} flight."],
     "values": {}, "draw": {"origin": "city", "destination": "city"},
     "final": "Booked flight {flight_id}, booking reference {booking_ref}."},
    {"lookup": "find_restaurant", "act": "book_table", "link": {"restaurant_id": "restaurant_id"}, "result": "reservation",
     "templates": ["Find a {cuisine} restaurant in {city} and book a table for {people}.", "Reserve a table for {people} at a {cuisine} place in {city}."],
     "values": {"cuisine": ["thai", "italian", "mexican", "korean", "indian", "greek", "japanese", "lebanese"]},
     "draw": {"city": "city", "people": "count"},
     "final": "Table for {people} booked at {restaurant_id}, reservation {reservation}."},
    {"lookup": "lookup_product", "act": "add_to_cart", "link": {"sku": "sku"}, "result": "cart_id",
     "templates": ["Add {quantity} of the {name} to my cart.", "Find the {name} and put {quantity} in my cart."],
     "values": {"name": ["blue yoga mat", "steel water bottle", "usb-c charger", "wireless mouse", "cotton tote bag", "desk lamp",
                         "running socks", "coffee grinder", "phone stand", "notebook set"]}, "draw": {"quantity": "count"},
     "final": "Added {quantity} x {sku} to cart {cart_id}."},
]  # fmt: skip


def run(call: dict) -> dict:
    """Execute one parsed call; problems come back as an ``error`` result, as a real tool API would."""
    fn = FUNCTIONS.get(call.get("name"))
    if fn is None:
        return {"error": f"unknown tool {call.get('name')!r}"}
    spec = SPECS[call["name"]]["function"]["parameters"]
    args = call.get("arguments") or {}
    missing = [k for k in spec["required"] if k not in args]
    extra = [k for k in args if k not in spec["properties"]]
    if missing or extra:
        return {"error": f"{call['name']}: missing {missing} / unexpected {extra}"}
    try:
        return fn(**args)
    except (TypeError, ValueError) as e:
        return {"error": f"{call['name']}: {e}"}


def result_message(result: dict) -> dict:
    """A tool result as the chat turn that carries it back to the model."""
    return {"role": "tool", "content": "<tool_response>" + json.dumps(result, ensure_ascii=False) + "</tool_response>"}


def scenario_value(rng: random.Random, scenario: dict, param: str, drawn: dict):
    """A value for one of a scenario's placeholders: people and cities from the shared banks (the two
    ends of a flight differ), counts from a range, the rest from the scenario's own list."""
    kind = scenario.get("draw", {}).get(param)
    if kind == "person":
        return arg_values.person(rng)
    if kind == "city":
        return rng.choice([c for c in arg_values.CITIES if c not in drawn.values()])
    if kind == "count":
        return rng.randint(1, 8)
    return rng.choice(scenario["values"][param])
