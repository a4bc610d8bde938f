"""Cosign-compatible signatures: pure verification and signing over bytes (no I/O in this package)."""
