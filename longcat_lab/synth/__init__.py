"""Multi-agent task synthesis verified like τ²-bench (docs/design.md §5.3): two small domains (`bank`, `shop`) with
plain-data databases, tools and written policies; scripted agents (task designer, user simulator, expert solver)
that produce reference dialogues on three difficulty axes; a verifier and pass^k; `generate` and `summarize`
(`dialogues`) for the `longcat-lab synth` command."""

from longcat_lab.synth.agents import (
    AXES,
    DOMAINS,
    ExpertSolver,
    SolverError,
    TaskDesigner,
    UserSimulator,
    Verdict,
    pass_hat_k,
    replay,
    to_record,
    verify,
)
from longcat_lab.synth.bank import BankEnv
from longcat_lab.synth.dialogues import format_summary, generate, summarize
from longcat_lab.synth.env import STOP, Environment, Task
from longcat_lab.synth.shop import ShopEnv

__all__ = [
    "AXES",
    "DOMAINS",
    "STOP",
    "BankEnv",
    "Environment",
    "ExpertSolver",
    "ShopEnv",
    "SolverError",
    "Task",
    "TaskDesigner",
    "UserSimulator",
    "Verdict",
    "format_summary",
    "generate",
    "pass_hat_k",
    "replay",
    "summarize",
    "to_record",
    "verify",
]
