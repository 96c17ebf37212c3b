"""The bank domain (docs/design.md §5.3): customers with a checking and a savings account, transfers within the balance
and the remaining daily limit, identity checks by PIN. `BankEnv` holds the database and tools; `design_bank` is the
task designer's half for this domain (it reads the database directly); `BankExpert` is the expert solver's half (it
learns everything through tool calls).
"""

from __future__ import annotations

import random
from typing import Literal

from longcat_lab.synth.env import Environment, Task
from longcat_lab.tools import ToolError

MAX_LIMIT = 5000
NAMES = ("Ada Park", "Ben Ito", "Cleo Diaz", "Dev Rao", "Eva Lund", "Finn Moss", "Gia Roy", "Hugo Sato")


class BankEnv(Environment):
    domain = "bank"
    policy = (
        "You are a bank's support agent. Policy: (1) before reading a customer's accounts or changing anything, "
        "find the customer by name and verify their identity with their PIN; (2) a transfer must be a positive whole "
        "amount, no more than the source balance and no more than the remaining daily limit (daily_limit - "
        f"sent_today); (3) a daily limit must be between 1 and {MAX_LIMIT}; (4) confirm the details with the customer "
        "before any change, and tell them the result."
    )
    read_tools = ("find_customer", "verify_identity", "list_accounts", "get_account", "find_payee_account")
    write_tools = ("set_daily_limit", "transfer")
    distractor_tools = ("get_exchange_rate", "list_branches", "get_interest_rate")

    def _owned(self, account_id: str) -> dict:
        account = self.record("accounts", account_id)
        self.require_verified(account["owner"])
        return account

    def find_customer(self, name: str) -> str:
        """Find a customer's id by their full name.

        Args:
            name: the customer's full name, e.g. "Ada Park"
        """
        for cid, c in sorted(self.state["customers"].items()):
            if c["name"].lower() == name.strip().lower():
                return cid
        raise ToolError(f"no customer named {name!r}")

    def verify_identity(self, customer_id: str, pin: str) -> dict:
        """Verify a customer's identity with their PIN.

        Args:
            customer_id: the id find_customer returned
            pin: the four-digit PIN the customer gave
        """
        if self.record("customers", customer_id)["pin"] != pin:
            raise ToolError("the PIN does not match")
        self.verified.add(customer_id)
        return {"customer_id": customer_id, "verified": True}

    def list_accounts(self, customer_id: str) -> list:
        """List a verified customer's accounts.

        Args:
            customer_id: the verified customer's id
        """
        self.require_verified(customer_id)
        rows = self.state["accounts"].items()
        return [{"account_id": a, "kind": r["kind"]} for a, r in sorted(rows) if r["owner"] == customer_id]

    def get_account(self, account_id: str) -> dict:
        """Balance, daily limit and amount sent today of one of the verified customer's accounts.

        Args:
            account_id: the account id
        """
        return {"account_id": account_id, **self._owned(account_id)}

    def find_payee_account(self, name: str) -> str:
        """The checking account that receives transfers for a customer, by name (the public payee directory).

        Args:
            name: the payee's full name
        """
        cid = self.find_customer(name)
        return next(
            a for a, r in sorted(self.state["accounts"].items()) if r["owner"] == cid and r["kind"] == "checking"
        )

    def set_daily_limit(self, account_id: str, limit: int) -> dict:
        """Change the daily transfer limit of one of the verified customer's accounts.

        Args:
            account_id: the account id
            limit: the new daily limit, 1 to 5000
        """
        account = self._owned(account_id)
        if not 1 <= limit <= MAX_LIMIT:
            raise ToolError(f"limit={limit} is outside 1..{MAX_LIMIT}")
        account["daily_limit"] = limit
        return {"account_id": account_id, "daily_limit": limit}

    def transfer(self, from_account: str, to_account: str, amount: int) -> dict:
        """Transfer money from one of the verified customer's accounts to another account.

        Args:
            from_account: the source account id
            to_account: the receiving account id
            amount: a positive whole amount
        """
        source, target = self._owned(from_account), self.record("accounts", to_account)
        remaining = source["daily_limit"] - source["sent_today"]
        if from_account == to_account or not 0 < amount <= min(source["balance"], remaining):
            raise ToolError(f"amount={amount} is not allowed: balance {source['balance']}, remaining limit {remaining}")
        source["balance"] -= amount
        source["sent_today"] += amount
        target["balance"] += amount
        self.state["transfers"].append({"from": from_account, "to": to_account, "amount": amount})
        return {"from_account": from_account, "amount": amount, "new_balance": source["balance"]}

    def get_exchange_rate(self, currency: str) -> float:
        """Today's exchange rate of a currency against ours.

        Args:
            currency: a three-letter code such as "USD"
        """
        return {"USD": 1.08, "GBP": 0.85, "JPY": 162.0}.get(currency.upper(), 1.0)

    def list_branches(self, city: str) -> list:
        """The bank's branches in a city.

        Args:
            city: the city name
        """
        return [f"{city} Central", f"{city} North"]

    def get_interest_rate(self, kind: Literal["checking", "savings"]) -> float:
        """The interest rate of an account kind.

        Args:
            kind: checking or savings
        """
        return 0.001 if kind == "checking" else 0.021


def _state(rng: random.Random) -> dict:
    names = rng.sample(NAMES, 4)
    customers = {f"C{i + 1}": {"name": n, "pin": f"{rng.randrange(10000):04d}"} for i, n in enumerate(names)}
    accounts = {}
    for i, cid in enumerate(customers):
        for j, kind in enumerate(("checking", "savings")):
            limit = rng.choice((500, 1000, 1500, 2000))
            accounts[f"A{i + 1}{j}{rng.randrange(10)}"] = {
                "owner": cid,
                "kind": kind,
                "balance": rng.randrange(400, 6000),
                "daily_limit": limit,
                "sent_today": rng.randrange(0, 300, 10),
            }
    return {"customers": customers, "accounts": accounts, "transfers": []}


def fact_amount(amount: int) -> str:
    return f"transferred {amount}"


def fact_balance(account_id: str, balance: int) -> str:
    return f"new balance of {account_id} is {balance}"


def design_bank(rng: random.Random, difficulty: dict[str, int], task_id: str) -> Task:
    """Compose one bank task at `difficulty` with its reference actions (computed from the database directly)."""
    info, toolset, user = difficulty["information"], difficulty["toolset"], difficulty["user"]
    state = _state(rng)
    me, payee = rng.sample(sorted(state["customers"]), 2)
    mine = {r["kind"]: a for a, r in state["accounts"].items() if r["owner"] == me}
    from_kind = rng.choice(("checking", "savings"))
    source, dest = (
        mine[from_kind],
        next(a for a, r in sorted(state["accounts"].items()) if r["owner"] == payee and r["kind"] == "checking"),
    )
    acc = state["accounts"][source]
    new_limit = rng.choice((2500, 3000, 4000)) if toolset >= 2 else None
    remaining = (new_limit or acc["daily_limit"]) - acc["sent_today"]

    def amount_for(slot):  # a fixed amount, or a fraction of the balance capped by the remaining limit
        return slot if isinstance(slot, int) else min(acc["balance"] // slot["fraction"], remaining)

    cap = min(acc["balance"], remaining)
    if info == 3:
        first = {"fraction": rng.choice((2, 3))}
        changed = {"fraction": 5 - first["fraction"]}
    else:
        first, changed = rng.sample(range(10, cap + 1, 10), 2) if cap >= 20 else (cap, cap)
    amount_slot = changed if user == 3 else first
    payee_name = state["customers"][payee]["name"]
    intent = {"to_account": dest} if info == 1 else {"payee": payee_name}
    intent |= {"from_account": source} if info == 1 else {"from_kind": from_kind}
    intent["amount"] = first
    if new_limit:
        intent["new_limit"] = new_limit
    if toolset == 3:
        intent["restore_limit"] = True
    who = state["customers"][me]
    clarify_slot = "from_account" if info == 1 else "from_kind"
    user_scenario = {
        "identity": {"name": who["name"], "pin": who["pin"]},
        "withhold_identity": user >= 2,
        "clarify_slot": clarify_slot if user == 3 else None,
        "change": {"amount": changed} if user == 3 else None,
    }
    actions = [{"name": "verify_identity", "arguments": {"customer_id": me, "pin": who["pin"]}}]
    if new_limit:
        actions.append({"name": "set_daily_limit", "arguments": {"account_id": source, "limit": new_limit}})
    amount = amount_for(amount_slot)
    actions.append({"name": "transfer", "arguments": {"from_account": source, "to_account": dest, "amount": amount}})
    if toolset == 3:
        restore = {"account_id": source, "limit": acc["daily_limit"]}
        actions.append({"name": "set_daily_limit", "arguments": restore})
    tools = ["find_customer", "verify_identity", "transfer"]
    tools += ["list_accounts", "find_payee_account"] if info >= 2 else []
    tools += ["get_account"] if info == 3 or toolset == 3 else []
    tools += ["set_daily_limit"] if toolset >= 2 else []
    tools += list(BankEnv.distractor_tools[: {1: 0, 2: 2, 3: 3}[toolset]])
    rng.shuffle(tools)
    info_facts = [fact_amount(amount), fact_balance(source, acc["balance"] - amount)]
    return Task(task_id, "bank", dict(difficulty), state, tools, intent, user_scenario, actions, info_facts)


class BankExpert:
    """The expert solver's knowledge of the bank: how to ask, what to look up, what to change, what to say."""

    identity_slots = ("name", "pin")
    identity_question = "I can help with that. First, please tell me your full name and your PIN."
    clarify_questions = {
        "from_account": "Which of your accounts should the money come from? Please give its account id.",
        "from_kind": "Should the money come from your checking or your savings account?",
    }

    @staticmethod
    def missing(known: dict) -> list[str]:
        """Details the request lacks: the source account (an id when the user named a target account by id)."""
        if "from_account" in known or "from_kind" in known:
            return []
        return ["from_account" if "to_account" in known else "from_kind"]

    @staticmethod
    def authenticate(solver, known: dict) -> str:
        (cid,) = solver.call([("find_customer", {"name": known["name"]})])
        solver.call([("verify_identity", {"customer_id": cid, "pin": known["pin"]})])
        return cid

    @staticmethod
    def plan(solver, cid: str, known: dict) -> tuple[list[list[tuple[str, dict]]], str]:
        """Look up what the request needs, then return the dependent write steps and the confirmation text."""
        lookups = []
        if "from_account" not in known:
            lookups.append(("list_accounts", {"customer_id": cid}))
        if "to_account" not in known:
            lookups.append(("find_payee_account", {"name": known["payee"]}))
        results = solver.call(lookups) if lookups else []  # independent lookups go out in parallel
        source = known.get("from_account")
        if source is None:
            source = next(a["account_id"] for a in results[0] if a["kind"] == known["from_kind"])
        dest = known.get("to_account") or results[-1]
        need_account = not isinstance(known["amount"], int) or known.get("restore_limit")
        account = solver.call([("get_account", {"account_id": source})])[0] if need_account else None
        limit = known.get("new_limit")
        steps = [[("set_daily_limit", {"account_id": source, "limit": limit})]] if limit else []
        amount = known["amount"]
        if not isinstance(amount, int):
            remaining = (limit or account["daily_limit"]) - account["sent_today"]
            amount = min(account["balance"] // amount["fraction"], remaining)
        steps.append([("transfer", {"from_account": source, "to_account": dest, "amount": amount})])
        if known.get("restore_limit"):
            steps.append([("set_daily_limit", {"account_id": source, "limit": account["daily_limit"]})])
        text = f"To confirm: I will transfer {amount} from {source} to {dest}"
        text += f", after raising the daily limit to {limit}" if limit else ""
        text += f", then set the limit back to {account['daily_limit']}" if known.get("restore_limit") else ""
        return steps, text + "."

    @staticmethod
    def report(results: list) -> str:
        """The closing message, with the facts the task asks the agent to tell."""
        t = next(r for r in results if "new_balance" in r)
        return f"Done: I {fact_amount(t['amount'])}; the {fact_balance(t['from_account'], t['new_balance'])}."


def user_says(slot: str, value, change: bool = False) -> str:
    """What the user simulator says when it reveals `slot` (identity, a withheld detail, or a change of mind)."""
    if slot == "identity":
        return f"My name is {value['name']} and my PIN is {value['pin']}."
    if change:
        return f"Actually, {describe_amount(value)} instead, please."
    return {"from_account": f"From account {value}.", "from_kind": f"From my {value} account."}[slot]


def opening(intent: dict, withheld: set[str]) -> str:
    """The user's first message: the request, without the details in `withheld`."""
    source = ""
    if not withheld & {"from_account", "from_kind"}:
        source = f" from account {intent['from_account']}" if "from_account" in intent else ""
        source = source or f" from my {intent['from_kind']} account"
    to = f"account {intent['to_account']}" if "to_account" in intent else intent["payee"]
    text = f"Hi, I'd like to send {describe_amount(intent['amount'])}{source} to {to}."
    if "new_limit" in intent:
        text += f" Please raise that account's daily limit to {intent['new_limit']} first."
    if intent.get("restore_limit"):
        text += " Afterwards, set the limit back to what it was."
    return text


def describe_amount(amount) -> str:
    return str(amount) if isinstance(amount, int) else f"1/{amount['fraction']} of the balance (as much as allowed)"


EXPERT = BankExpert
