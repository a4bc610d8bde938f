"""Every outside system behind one small adapter: engine, registry, state store, wake-up socket, MQTT.

All I/O lives here; nothing here makes a policy decision. May import :mod:`agent.core`,
:mod:`agent.verify`, :mod:`agent.config` and :mod:`agent.errors`.
"""
