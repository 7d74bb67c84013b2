"""The ``fl-coordinator`` commands and the client tools they use (``watch``, the health
probe). Each command imports only what it runs (see :mod:`.main`)."""

__all__: list[str] = []
