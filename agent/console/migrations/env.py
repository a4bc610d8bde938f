"""Alembic's environment for the console database: always run with the connection FleetStore hands over."""

from __future__ import annotations

from alembic import context

from agent.console.fleetdb import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only FleetStore.migrate runs these migrations
    raise RuntimeError(
        "run the console's migrations with FleetStore.migrate() or 'imageguard console db upgrade'"
    )
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
