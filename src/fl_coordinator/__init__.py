"""fl-coordinator: the coordinator of a hierarchical federated-learning system, on trio."""

__version__ = "0.1.0"
