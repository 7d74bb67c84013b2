"""The round, sans-I/O: stages and their transition table, events and effects, the machine.

Nothing here imports trio or touches a file or a socket: the round task
(:mod:`fl_coordinator.coordinator`) feeds the machine events and carries out
its effects.
"""

__all__: list[str] = []
