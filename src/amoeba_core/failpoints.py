"""Named fault-injection points, for testing the failure contract (README "When things go wrong").

retp() calls hit(name) at every phase boundary and inside the move phase; nothing happens unless a test armed that
point in this process. Points:

  "validate", "plan", "agree", "prepare", "confirm"   once per call, at the start of the phase
  "move.weights"    before each weight round (and before each tensor finished without an exchange)
  "move.kv"         before each KV round of each layer
  "move.posted"     inside an exchange, after this rank posted its sends and receives, before it waits (same-host
                    transport: after the round's pulls, before it says so and waits for its readers)

    arm("move.kv", after=3, action="raise")   # the 4th hit of "move.kv" raises InjectedFault
    arm("move.posted", action="exit")         # the process dies on the spot (os._exit), like a crash
    arm("agree", action="hang")               # the rank stops answering (sleeps), like a stuck process

Arming is per process (each rank arms its own points); disarm() clears everything.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

POINTS = ("validate", "plan", "agree", "prepare", "move.weights", "move.kv", "move.posted", "confirm")
ACTIONS = ("raise", "exit", "hang")

_armed: Dict[str, List] = {}  # name -> [remaining hits before firing, action]


class InjectedFault(RuntimeError):
    """The exception an armed point raises (deliberately not an AmoebaError: it stands for any foreign error)."""


def arm(name: str, *, after: int = 0, action: str = "raise") -> None:
    """Fire at the (after + 1)-th hit of point `name` in this process."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; points are {POINTS}")
    if action not in ACTIONS:
        raise ValueError(f"unknown fault action {action!r}; actions are {ACTIONS}")
    _armed[name] = [int(after), action]


def disarm() -> None:
    _armed.clear()


def armed() -> List[str]:
    """Points armed in this process that have not fired yet."""
    return sorted(_armed)


def hit(name: str) -> None:
    entry = _armed.get(name)
    if entry is None:
        return
    if entry[0] > 0:
        entry[0] -= 1
        return
    del _armed[name]
    if entry[1] == "exit":
        os._exit(17)
    if entry[1] == "hang":
        time.sleep(3600)
    raise InjectedFault(f"fault injected at {name!r}")
