"""The shop domain (docs/design.md §5.3): customers with orders, returns of delivered items, cancellations of orders
still processing, identity checks by e-mail and postcode. `ShopEnv` holds the database and tools; `design_shop` is
the task designer's half (it reads the database directly); `ShopExpert` is the expert solver's half (tool calls only).
"""

from __future__ import annotations

import random

from longcat_lab.synth.env import Environment, Task
from longcat_lab.tools import ToolError

NAMES = ("Ada Park", "Ben Ito", "Cleo Diaz", "Dev Rao", "Eva Lund", "Finn Moss")
PRODUCTS = ("kettle", "lamp", "toaster", "blender", "mug set", "scarf", "backpack", "headphones", "clock", "rug")


class ShopEnv(Environment):
    domain = "shop"
    policy = (
        "You are an online shop's support agent. Policy: (1) before reading a customer's orders or changing "
        "anything, find the customer by e-mail and verify them with their postcode; (2) only delivered orders can "
        "have items returned, each item once, refunded at the product's price; (3) only orders still processing can "
        "be cancelled, refunding every item; (4) confirm the details with the customer before any change, and tell "
        "them the refunds."
    )
    read_tools = ("find_customer_by_email", "verify_customer", "list_orders", "get_order", "get_product")
    write_tools = ("return_item", "cancel_order")
    distractor_tools = ("track_package", "list_stores", "get_gift_card_balance")

    def _order(self, order_id: str) -> dict:
        order = self.record("orders", order_id)
        self.require_verified(order["customer"])
        return order

    def find_customer_by_email(self, email: str) -> str:
        """Find a customer's id by e-mail address.

        Args:
            email: the customer's e-mail address
        """
        for cid, c in sorted(self.state["customers"].items()):
            if c["email"] == email.strip().lower():
                return cid
        raise ToolError(f"no customer with e-mail {email!r}")

    def verify_customer(self, customer_id: str, zip_code: str) -> dict:
        """Verify a customer with the postcode of their address.

        Args:
            customer_id: the id find_customer_by_email returned
            zip_code: the postcode the customer gave
        """
        if self.record("customers", customer_id)["zip"] != zip_code:
            raise ToolError("the postcode does not match")
        self.verified.add(customer_id)
        return {"customer_id": customer_id, "verified": True}

    def list_orders(self, customer_id: str) -> list:
        """A verified customer's orders with their status and order day.

        Args:
            customer_id: the verified customer's id
        """
        self.require_verified(customer_id)
        rows = sorted(self.state["orders"].items())
        return [
            {"order_id": o, "status": r["status"], "day": r["day"]} for o, r in rows if r["customer"] == customer_id
        ]

    def get_order(self, order_id: str) -> dict:
        """One of the verified customer's orders: status, day, items (product id and name) and returned items.

        Args:
            order_id: the order id
        """
        order = self._order(order_id)
        items = [{"product_id": p, "name": self.state["products"][p]["name"]} for p in order["items"]]
        return {"order_id": order_id, "status": order["status"], "day": order["day"], "items": items,
                "returned": list(order["returned"])}  # fmt: skip

    def get_product(self, product_id: str) -> dict:
        """A product's name, price and stock.

        Args:
            product_id: the product id
        """
        return {"product_id": product_id, **self.record("products", product_id)}

    def return_item(self, order_id: str, product_id: str) -> dict:
        """Return one item of a delivered order of the verified customer and refund its price.

        Args:
            order_id: the order id
            product_id: the product to return
        """
        order = self._order(order_id)
        if order["status"] != "delivered" or product_id not in order["items"] or product_id in order["returned"]:
            raise ToolError(f"{product_id} cannot be returned from order {order_id} ({order['status']})")
        order["returned"].append(product_id)
        product = self.state["products"][product_id]
        product["stock"] += 1
        self.state["refunds"].append({"order": order_id, "product": product_id, "amount": product["price"]})
        return {"order_id": order_id, "product_id": product_id, "refund": product["price"]}

    def cancel_order(self, order_id: str) -> dict:
        """Cancel an order of the verified customer that is still processing and refund all its items.

        Args:
            order_id: the order id
        """
        order = self._order(order_id)
        if order["status"] != "processing":
            raise ToolError(f"order {order_id} is {order['status']}; only processing orders can be cancelled")
        order["status"] = "cancelled"
        refund = sum(self.state["products"][p]["price"] for p in order["items"])
        self.state["refunds"].append({"order": order_id, "product": None, "amount": refund})
        return {"order_id": order_id, "refund": refund}

    def track_package(self, order_id: str) -> str:
        """Where a shipped package is.

        Args:
            order_id: the order id
        """
        return "in transit"

    def list_stores(self, city: str) -> list:
        """The shop's stores in a city.

        Args:
            city: the city name
        """
        return [f"{city} Mall"]

    def get_gift_card_balance(self, card_number: str) -> int:
        """The balance of a gift card.

        Args:
            card_number: the number printed on the card
        """
        return 0


def _state(rng: random.Random) -> dict:
    names = rng.sample(NAMES, 4)
    prices = rng.sample(range(5, 300), len(PRODUCTS))  # distinct, so "most expensive" has one answer
    products = {
        f"P{i + 1}": {"name": n, "price": p, "stock": rng.randrange(5)}
        for i, (n, p) in enumerate(zip(PRODUCTS, prices))
    }
    customers, orders = {}, {}
    for i, name in enumerate(names):
        cid = f"U{i + 1}"
        customers[cid] = {
            "name": name,
            "email": f"{name.split()[0].lower()}@example.com",
            "zip": f"{rng.randrange(10**5):05d}",
        }
        days = rng.sample(range(1, 60), 3)
        for j, status in enumerate(("delivered", "delivered", "processing")):
            items = rng.sample(sorted(products), 3 if status == "delivered" else 2)
            orders[f"O{i + 1}{j}{rng.randrange(10)}"] = {"customer": cid, "status": status, "day": days[j],
                                                         "items": items, "returned": []}  # fmt: skip
    return {"customers": customers, "products": products, "orders": orders, "refunds": []}


def fact_refund(product_id: str, amount: int) -> str:
    return f"refund of {amount} for {product_id}"


def fact_cancel(order_id: str, amount: int) -> str:
    return f"order {order_id} is cancelled with a refund of {amount}"


def fact_total(amount: int) -> str:
    return f"total refund is {amount}"


def design_shop(rng: random.Random, difficulty: dict[str, int], task_id: str) -> Task:
    """Compose one shop task at `difficulty` with its reference actions (computed from the database directly)."""
    info, toolset, user = difficulty["information"], difficulty["toolset"], difficulty["user"]
    state = _state(rng)
    me = rng.choice(sorted(state["customers"]))
    mine = {o: r for o, r in state["orders"].items() if r["customer"] == me}
    delivered = sorted((r["day"], o) for o, r in mine.items() if r["status"] == "delivered")
    latest = delivered[-1][1]
    oid = latest if info >= 2 else rng.choice(delivered)[1]
    items = state["orders"][oid]["items"]
    price = {p: state["products"][p]["price"] for p in items}
    first, second = rng.sample(items, 2)
    if info == 1:
        slot, values = "product_id", (first, second)
    elif info == 2:
        slot, values = "product_name", (state["products"][first]["name"], state["products"][second]["name"])
    else:
        slot, values = "pick", rng.sample(["most expensive", "cheapest"], 2)
    value = values[1] if user == 3 else values[0]
    if info == 3:
        target = (max if value == "most expensive" else min)(items, key=price.__getitem__)
    else:
        target = value if info == 1 else next(p for p in items if state["products"][p]["name"] == value)
    intent = {"order_id": oid} if info == 1 else {"order": "latest delivered"}
    intent[slot] = values[0]
    processing = next(o for o, r in sorted(mine.items()) if r["status"] == "processing")
    if toolset >= 2:
        intent["cancel_processing"] = True
    who = state["customers"][me]
    user_scenario = {
        "identity": {"email": who["email"], "zip": who["zip"]},
        "withhold_identity": user >= 2,
        "clarify_slot": slot if user == 3 else None,
        "change": {slot: values[1]} if user == 3 else None,
    }
    actions = [
        {"name": "verify_customer", "arguments": {"customer_id": me, "zip_code": who["zip"]}},
        {"name": "return_item", "arguments": {"order_id": oid, "product_id": target}},
    ]
    facts = [fact_refund(target, price[target])]
    if toolset >= 2:
        actions.append({"name": "cancel_order", "arguments": {"order_id": processing}})
        cancelled = sum(state["products"][p]["price"] for p in state["orders"][processing]["items"])
        facts.append(fact_cancel(processing, cancelled))
        if toolset == 3:
            facts.append(fact_total(price[target] + cancelled))
    tools = ["find_customer_by_email", "verify_customer", "return_item"]
    tools += ["list_orders"] if info >= 2 or toolset >= 2 else []
    tools += ["get_order"] if info >= 2 else []
    tools += ["get_product"] if info == 3 else []
    tools += ["cancel_order"] if toolset >= 2 else []
    tools += list(ShopEnv.distractor_tools[: {1: 0, 2: 2, 3: 3}[toolset]])
    rng.shuffle(tools)
    return Task(task_id, "shop", dict(difficulty), state, tools, intent, user_scenario, actions, facts)


def _item_text(slot: str, value: str) -> str:
    return {"product_id": f"item {value}", "product_name": f"the {value}", "pick": f"the {value} item"}[slot]


def user_says(slot: str, value, change: bool = False) -> str:
    """What the user simulator says when it reveals `slot` (identity, a withheld detail, or a change of mind)."""
    if slot == "identity":
        return f"My e-mail is {value['email']} and my postcode is {value['zip']}."
    return f"Actually, I'd rather return {_item_text(slot, value)}." if change else f"I mean {_item_text(slot, value)}."


def opening(intent: dict, withheld: set[str]) -> str:
    """The user's first message: the request, without the details in `withheld`."""
    slot = next(s for s in ("product_id", "product_name", "pick") if s in intent)
    what = "an item" if slot in withheld else _item_text(slot, intent[slot])
    where = f"order {intent['order_id']}" if "order_id" in intent else "my most recent delivered order"
    text = f"Hello, I want to return {what} from {where}."
    if intent.get("cancel_processing"):
        text += " Also, please cancel my order that is still processing."
    return text


class ShopExpert:
    """The expert solver's knowledge of the shop: how to ask, what to look up, what to change, what to say."""

    identity_slots = ("email", "zip")
    identity_question = "Happy to help. Please tell me the e-mail address on your account and your postcode."
    clarify_questions = {"item": "Which item would you like to return?"}

    @staticmethod
    def missing(known: dict) -> list[str]:
        return [] if any(s in known for s in ("product_id", "product_name", "pick")) else ["item"]

    @staticmethod
    def authenticate(solver, known: dict) -> str:
        (cid,) = solver.call([("find_customer_by_email", {"email": known["email"]})])
        solver.call([("verify_customer", {"customer_id": cid, "zip_code": known["zip"]})])
        return cid

    @staticmethod
    def plan(solver, cid: str, known: dict) -> tuple[list[list[tuple[str, dict]]], str]:
        """Look up what the request needs, then return the dependent write steps and the confirmation text."""
        orders = []
        if "order_id" not in known or known.get("cancel_processing"):
            (orders,) = solver.call([("list_orders", {"customer_id": cid})])
        oid = known.get("order_id") or max((o["day"], o["order_id"]) for o in orders if o["status"] == "delivered")[1]
        pid = known.get("product_id")
        if pid is None:
            (order,) = solver.call([("get_order", {"order_id": oid})])
            if "product_name" in known:
                pid = next(i["product_id"] for i in order["items"] if i["name"] == known["product_name"])
            else:  # independent lookups go out in parallel
                products = solver.call([("get_product", {"product_id": i["product_id"]}) for i in order["items"]])
                pick = max if known["pick"] == "most expensive" else min
                pid = pick(products, key=lambda p: p["price"])["product_id"]
        steps = [[("return_item", {"order_id": oid, "product_id": pid})]]
        text = f"To confirm: I will return {pid} from order {oid}"
        if known.get("cancel_processing"):
            processing = next(o["order_id"] for o in orders if o["status"] == "processing")
            steps.append([("cancel_order", {"order_id": processing})])
            text += f" and cancel order {processing}"
        return steps, text + "."

    @staticmethod
    def report(results: list) -> str:
        """The closing message, with the facts the task asks the agent to tell."""
        parts = [fact_refund(results[0]["product_id"], results[0]["refund"])]
        if len(results) > 1:
            parts += [fact_cancel(results[1]["order_id"], results[1]["refund"])]
            parts += [fact_total(results[0]["refund"] + results[1]["refund"])]
        return "Done: " + "; ".join(parts) + "."


EXPERT = ShopExpert
