"""Reference selector and client speaking the Go system's wire contract, and the local demo.

None of this is needed to run the coordinator; it exists so that a whole
federation can run on one machine, for the demo and for end-to-end tests.
"""

__all__: list[str] = []
