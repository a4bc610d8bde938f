"""Signature checks over bytes: cosign's schemes and signed policy documents.

One module per scheme, chosen through the explicit map in :mod:`agent.verify.schemes`. Pure crypto: the
registry I/O that fetches signatures lives in :mod:`agent.adapters`. May import :mod:`agent.core`,
:mod:`agent.config` and :mod:`agent.errors`.
"""
