"""The problem folder on shared storage: its layout, atomic writes, the round journal and
checkpoint history, FedAvg over HDF5, start-up checks and the built-in model."""

__all__: list[str] = []
