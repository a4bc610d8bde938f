"""The cloud side: a console that drives devices over MQTT (requests, rollouts, alerts).

Shares the MQTT adapter and the policy model with the device; never imports the device's control plane or
runtime. May import :mod:`agent.adapters` and everything below it.
"""
