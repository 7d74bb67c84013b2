"""What the coordinator tells the world: the status message schema and its hub, the
websocket status stream, the webhook, the legacy FlStatus push, and the Prometheus metrics
with their endpoint."""

__all__: list[str] = []
