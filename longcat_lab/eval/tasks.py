"""Task metrics on held-out documents (the validation split, decoded from its token stream, so the model never
trained on them):

- `arithmetic`: greedy generation of the worked solution of each held-out problem from its first line; exact when
  `data.check_solution` accepts every step and the answer is the reference answer. Reported by number of steps.
- `code`: two cheap checks on held-out Python functions. *Parse rate*: from a function's `def` line, sample a body
  until the function ends (a line indented no deeper than the `def`) and count the bodies that `ast.parse` accepts.
  *Next-line exact match*: greedy-complete one body line from everything above it, against the real line, next to
  the trivial baseline "the line repeats the one above". Model text is only parsed, never executed.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field

import torch

from longcat_lab._util import check_int
from longcat_lab.data import check_solution, eot_id
from longcat_lab.inference.generate import stream


def heldout_documents(dataset, domain: str) -> list[str]:
    """The validation documents of `domain`, decoded from the packed stream (split at the separator)."""
    if domain not in dataset.val:
        raise ValueError(f"domain={domain!r} is not allowed: this data has {sorted(dataset.val)}")
    eot = eot_id(dataset.tokenizer)
    ids = dataset.val[domain].tolist()
    docs, start = [], 0
    for i, t in enumerate(ids + [eot]):
        if t == eot:
            if i > start:
                docs.append(dataset.tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs


def complete(model, tokenizer, prompt: str, max_new_tokens: int, stop, temperature: float = 0.0, seed: int = 0):
    """Decode after `<|endoftext|>` + prompt (a document start, as in training) until `stop(text)` is true, the
    separator comes, or `max_new_tokens`; returns the generated text. The prompt keeps its last tokens if long."""
    eot = eot_id(tokenizer)
    ids = [eot] + tokenizer.encode(prompt).ids
    ids = ids[-max(1, model.config.max_position_embeddings - max_new_tokens) :]
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out: list[int] = []
    for token in stream(model, idx, max_new_tokens, temperature=temperature, generator=gen):
        t = int(token[0, 0])
        if t == eot:
            break
        out.append(t)
        if stop(tokenizer.decode(out)):
            break
    return tokenizer.decode(out)


# Arithmetic ------------------------------------------------------------------------------------------------------
@dataclass
class ArithmeticResult:
    problems: int
    exact: int
    by_steps: dict[int, list[int]] = field(default_factory=dict)  # steps -> [exact, total]
    transcripts: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.exact / self.problems if self.problems else float("nan")

    def to_dict(self) -> dict:
        return {
            "problems": self.problems,
            "exact": self.exact,
            "accuracy": self.accuracy,
            "by_steps": {str(k): {"exact": v[0], "total": v[1]} for k, v in sorted(self.by_steps.items())},
            "transcripts": self.transcripts,
        }


def _answer(text: str) -> str | None:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("Answer: ")]
    return lines[-1][len("Answer: ") :].strip() if lines else None


def arithmetic(model, dataset, n: int = 32, transcripts: int = 3, max_new_tokens: int = 160) -> ArithmeticResult:
    """Greedy exact match on the first `n` held-out reasoning problems (module docstring)."""
    check_int("n", n, 1)
    docs = [d for d in heldout_documents(dataset, "reasoning") if d.startswith("Problem: ")][:n]
    res = ArithmeticResult(0, 0)
    for doc in docs:
        prompt = doc.split("\n", 1)[0] + "\n"
        steps = sum(1 for ln in doc.splitlines() if ln.startswith("Step "))
        text = complete(model, dataset.tokenizer, prompt, max_new_tokens, lambda t: "Answer:" in t and t.endswith("\n"))
        full = prompt + text
        ok = check_solution(full) and _answer(full) == _answer(doc)
        res.problems += 1
        res.exact += ok
        cell = res.by_steps.setdefault(steps, [0, 0])
        cell[0] += ok
        cell[1] += 1
        if len(res.transcripts) < transcripts:
            res.transcripts.append({"prompt": prompt, "generated": text, "reference": doc, "exact": bool(ok)})
    return res


# Code ------------------------------------------------------------------------------------------------------------
def _functions(source: str) -> list[tuple[int, int, list[str]]]:
    """(first line, indentation, source lines) of every function in a held-out file with at least two body
    statements; [] when the file does not parse (a document cut by the byte cap)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) >= 2:
            line = lines[node.lineno - 1]
            if line.lstrip().startswith(("def ", "async def ")) and line.rstrip().endswith(":"):
                out.append((node.lineno - 1, len(line) - len(line.lstrip()), lines, node.body[1].lineno - 1))
    return out


def _ended(indent: int):
    """stop(text) for a body generated after a `def` line: a complete line that is not blank and is indented no
    deeper than the def (the body ended)."""

    def stop(text: str) -> bool:
        done = _after_newline(text).split("\n")[:-1]
        return any(ln.strip() and len(ln) - len(ln.lstrip()) <= indent for ln in done)

    return stop


def _after_newline(text: str) -> str:
    # Prompts end at the end of a line's text, not after its newline: the tokenizer joins a newline with the next
    # line's indentation, so a prompt that ends in "\n" would start the model on a token boundary training never had.
    return text.split("\n", 1)[1] if "\n" in text else ""


def _body(text: str, indent: int) -> str:
    """The generated body up to (without) the line that ends the function, complete lines only."""
    kept = []
    for ln in _after_newline(text).split("\n")[:-1]:
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        kept.append(ln)
    return "\n".join(kept) + "\n"


def code(model, dataset, n: int = 24, context_lines: int = 30, max_new_tokens: int = 96, seed: int = 0) -> dict:
    """Parse rate of sampled function bodies and next-line exact match on `n` held-out functions."""
    check_int("n", n, 1)
    funcs = [f for doc in heldout_documents(dataset, "python") for f in _functions(doc)][:n]
    parsed = exact = repeat = 0
    examples = []
    for k, (start, indent, lines, target) in enumerate(funcs):
        above = "\n".join(lines[max(0, start - context_lines) : start + 1])
        body = _body(complete(model, dataset.tokenizer, above, max_new_tokens, _ended(indent), 0.8, seed + k), indent)
        snippet = textwrap.dedent(lines[start] + "\n" + body)
        try:
            ast.parse(snippet)
            parsed += 1
        except (SyntaxError, ValueError):
            pass
        prefix = "\n".join(lines[max(0, target - context_lines) : target])
        text = complete(model, dataset.tokenizer, prefix, 48, lambda t: t.count("\n") >= 2)
        line = text.split("\n")[1] if text.startswith("\n") and text.count("\n") >= 2 else None
        exact += line is not None and line.rstrip() == lines[target].rstrip()
        repeat += lines[target - 1].rstrip() == lines[target].rstrip()
        if len(examples) < 2:
            examples.append({"prompt_tail": prefix[-200:], "generated": text, "reference": lines[target]})
    m = len(funcs)
    return {
        "functions": m,
        "parse_rate": parsed / m if m else float("nan"),
        "next_line_exact": exact / m if m else float("nan"),
        "repeat_line_baseline": repeat / m if m else float("nan"),
        "examples": examples,
    }


__all__ = ["ArithmeticResult", "arithmetic", "code", "complete", "heldout_documents"]
