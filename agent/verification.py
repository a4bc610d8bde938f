"""Signature verification for enforcement: registry lookups + validators (filled in by the verification work)."""

from __future__ import annotations

from agent.config import Config
from agent.enforcer import Verifier


def build_verifier(config: Config) -> Verifier | None:
    """The verifier the agent uses; None until signature verification is wired in."""
    return None
