"""Helpers shared by the tests: real peers, certificates, an HTTP sink, the repository's root."""

from pathlib import Path

#: The repository's root (README, scripts, Containerfile, manifests).
REPO = Path(__file__).resolve().parents[2]
