"""Agents on synthesised tasks (docs/design.md §5.5): `run_episode` plays one task with a model against the task's
environment and a live user simulator (`loop`), the baselines and the model as agents (`policies`), one tool-call
turn shared by every conversation (`turn`), arithmetic with and without the calculator (`arithmetic`), and the
terminal chat of `longcat-lab chat` (`chat`)."""

from longcat_lab.agent.loop import (
    DEFAULT_MAX_TURNS,
    STOP_REASONS,
    Episode,
    SimulatedUser,
    cell_name,
    play,
    run_episode,
)
from longcat_lab.agent.policies import ContextFull, ExpertAgent, ModelAgent, RandomValidAgent, generate_reply
from longcat_lab.agent.turn import Turn, tool_turn

__all__ = [
    "DEFAULT_MAX_TURNS",
    "STOP_REASONS",
    "ContextFull",
    "Episode",
    "ExpertAgent",
    "ModelAgent",
    "RandomValidAgent",
    "SimulatedUser",
    "Turn",
    "cell_name",
    "generate_reply",
    "play",
    "run_episode",
    "tool_turn",
]
