"""The "reasoning" domain: generated multi-step arithmetic word problems with worked solutions.

Every step is `a op b = c`, computed in code, so `check_solution` verifies a document by parsing each step, never by
running the text as Python. `SplitMix64` drives the generator, so the corpus is the same on every machine and Python.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterator

from longcat_lab.data.config import Document


class SplitMix64:
    """A tiny PRNG whose stream is fixed forever (Python's and numpy's may change between versions), so the
    generated corpus, and with it the golden loss curve, is the same everywhere."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi] (the modulo bias is below 1e-15 for our ranges)."""
        return lo + self.next() % (hi - lo + 1)

    def choice(self, seq):
        return seq[self.next() % len(seq)]


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_NAMES = (
    "Ada",
    "Bram",
    "Chloe",
    "Dev",
    "Esme",
    "Farid",
    "Gwen",
    "Hugo",
    "Ines",
    "Jonah",
    "Kira",
    "Luca",
    "Mei",
    "Nils",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sami",
    "Tess",
)
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "tickets", "bricks", "shells", "pencils", "seeds")
_BOXES = ("boxes", "crates", "bags", "jars", "trays")


def reasoning_problem(rng: SplitMix64) -> str:
    """One problem with a worked solution; each step is `Step i: a op b = c` computed here, and the answer is the
    last step's result. Division only ever divides exactly."""
    kind = rng.randint(0, 2)
    steps: list[tuple[int, str, int]] = []
    if kind == 0:  # a word problem: groups, a loss, a gain, sometimes an equal share
        name, item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_BOXES)
        groups, per, lost, gained = rng.randint(2, 12), rng.randint(3, 25), rng.randint(1, 20), rng.randint(1, 40)
        lost = min(lost, groups * per - 1)
        text = (
            f"{name} has {groups} {box} with {per} {item} in each. {name} gives away {lost} {item} "
            f"and then finds {gained} more."
        )
        steps = [(groups, "*", per), (None, "-", lost), (None, "+", gained)]
        share = rng.randint(2, 6)
        total = groups * per - lost + gained
        if total % share == 0:
            text += f" The {item} are shared equally among {share} friends. How many does each friend get?"
            steps.append((None, "/", share))
        else:
            text += f" How many {item} does {name} have now?"
    elif kind == 1:  # a chain of operations on a number
        start = rng.randint(2, 99)
        n_ops = rng.randint(2, 4)
        text = f"Start with {start}."
        steps_text = []
        value = start
        for _ in range(n_ops):
            op = rng.choice(("+", "-", "*"))
            b = rng.randint(2, 9) if op == "*" else rng.randint(1, 60)
            if op == "-" and b > value:
                op = "+"
            value = OPS[op](value, b)
            steps.append((None if steps else start, op, b))
            steps_text.append({"+": f"add {b}", "-": f"subtract {b}", "*": f"multiply by {b}"}[op])
        text += " Then " + ", then ".join(steps_text) + ". What is the result?"
    else:  # prices: quantity times price, a discount, change from a payment
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        qty, price, off = rng.randint(2, 15), rng.randint(2, 30), rng.randint(1, 10)
        total = qty * price - off
        paid = (total // 50 + 1) * 50
        text = (
            f"{name} buys {qty} {item} at {price} dollars each, gets a discount of {off} dollars, and pays with "
            f"{paid} dollars. How much change does {name} get?"
        )
        steps = [(qty, "*", price), (None, "-", off), (paid, "-", None)]
    lines = [f"Problem: {text}"]
    value = None
    for i, (a, op, b) in enumerate(steps, 1):
        a = value if a is None else a
        b = value if b is None else b
        value = OPS[op](a, b)
        lines.append(f"Step {i}: {a} {op} {b} = {value}")
    lines.append(f"Answer: {value}")
    return "\n".join(lines) + "\n"


_STEP = re.compile(r"^Step (\d+): (-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")


def check_solution(text: str) -> bool:
    """True when every step's arithmetic is right, each step uses a number from the problem or an earlier result,
    steps are numbered 1, 2, ..., and the answer is the last result. Parses; never evaluates code."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 3 or not lines[0].startswith("Problem: ") or not lines[-1].startswith("Answer: "):
        return False
    known = {int(n) for n in re.findall(r"\d+", lines[0])}
    result = None
    for i, line in enumerate(lines[1:-1], 1):
        m = _STEP.match(line)
        if not m or int(m.group(1)) != i:
            return False
        a, op, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
        if a not in known or b not in known:
            return False
        if op == "/" and (b == 0 or a % b):
            return False
        if OPS[op](a, b) != c:
            return False
        known.add(c)
        result = c
    answer = lines[-1][len("Answer: ") :].strip()
    return result is not None and re.fullmatch(r"-?\d+", answer) is not None and int(answer) == result


def reasoning_documents(seed: int = 0) -> Iterator[Document]:
    """The endless stream of generated problems; document i is problem i of the seeded stream."""
    rng = SplitMix64(seed)
    for i in itertools.count():
        yield Document(f"reasoning/{i}", reasoning_problem(rng))
