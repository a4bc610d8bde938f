"""The agent's loops: event monitor, enforcer, verifier, authorization plugin, outbox drainer, instance
reconciler.

Engine events flow in, pass the pure decision in :mod:`agent.core`, and leave as actions on the engine and
records in the store. May import :mod:`agent.adapters` and everything below it.
"""
