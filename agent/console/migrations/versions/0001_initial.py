"""initial schema: messages, devices, rollouts, rollout_devices, audit, settings

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "devices",
        sa.Column("device", sa.String(length=255), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("status_since", sa.Float(), nullable=False),
        sa.Column("status_ts", sa.BigInteger(), nullable=False),
        sa.Column("groups", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("agent_version", sa.Text(), nullable=False),
        sa.Column("policy_version", sa.Text(), nullable=False),
        sa.Column("policy_layers", sa.Text(), nullable=False),
        sa.Column("enforcement", sa.Text(), nullable=False),
        sa.Column("outbox_dropped", sa.BigInteger(), nullable=False),
        sa.Column("records_lost", sa.BigInteger(), nullable=False),
        sa.Column("decisions", sa.BigInteger(), nullable=False),
        sa.Column("alerts", sa.BigInteger(), nullable=False),
        sa.Column("last_decision", sa.Text(), nullable=True),
        sa.Column("last_decision_ts", sa.BigInteger(), nullable=True),
        sa.Column("last_decision_seq", sa.BigInteger(), nullable=True),
        sa.Column("last_alert", sa.Text(), nullable=True),
        sa.Column("last_alert_ts", sa.BigInteger(), nullable=True),
        sa.Column("last_alert_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("device"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("device", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("device_ts", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("replica", sa.String(length=64), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index("ix_messages_device_order", ["device", "device_ts", "seq"], unique=False)
        batch_op.create_index("ix_messages_kind_received", ["kind", "received_at"], unique=False)

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("group_name", sa.String(length=255), nullable=False),
        sa.Column("targets", sa.Text(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("waves", sa.Text(), nullable=False),
        sa.Column("max_rejections", sa.Integer(), nullable=True),
        sa.Column("max_alerts", sa.Integer(), nullable=True),
        sa.Column("wave_timeout", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("rollback_of", sa.String(length=32), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index("ix_rollouts_state", ["state"], unique=False)

    op.create_table(
        "settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("device", sa.String(length=255), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=True),
        sa.Column("answered_at", sa.Float(), nullable=True),
        sa.Column("dry_run", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device"),
    )
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_devices_device", ["device"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_devices_device")

    op.drop_table("rollout_devices")
    op.drop_table("settings")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index("ix_rollouts_state")

    op.drop_table("rollouts")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_kind_received")
        batch_op.drop_index("ix_messages_device_order")

    op.drop_table("messages")
    op.drop_table("devices")
    op.drop_table("audit")
