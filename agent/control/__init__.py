"""The device's control plane: policy service, policy acceptance (signing, targets) and the MQTT resources.

It only writes to the policy store; the runtime reads snapshots of it. May import :mod:`agent.runtime` and
everything below it.
"""
