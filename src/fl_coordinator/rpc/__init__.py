"""Everything that speaks gRPC: the listener, the servicers selectors call, the
``GoalCountReached`` client, the health service, bearer tokens, TLS and selector addresses."""

__all__: list[str] = []
