"""The pure core: typed values and rules, no I/O.

Owns digests, image references, container facts, trust anchors, the policy model, managed-instance specs,
the decision rules, reason codes and the telemetry record types. It reads no clock, socket or file (the JSON
Schemas it validates against are package data). May import only :mod:`agent.errors` and itself.
"""
