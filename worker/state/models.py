"""The state database: everything oprecon knows beyond the current read of both systems.

Findings with their lifecycle, every transition, every fix intent and outcome, runs,
digests sent, and a small key-value table (watermarks, pause flag, breaker, last
success). All of it is here before and after anything acts, so a killed worker loses
nothing a rerun cannot finish.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state database")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class FindingState(enum.StrEnum):
    PENDING = "pending"  # cross-system, seen once: confirmed only by a read >= delay later
    OPEN = "open"
    FIX_QUEUED = "fix_queued"
    HELD = "held"  # fix applied; the portal is catching up until next_check_at
    VERIFYING = "verifying"
    RESOLVED = "resolved"
    ESCALATED = "escalated"
    SILENCED = "silenced"


class ActionStatus(enum.StrEnum):
    INTENT = "intent"  # committed before the portal call
    # Claimed by one task (claimed_by, lease_until): only its holder may call the portal.
    APPLYING = "applying"
    APPLIED = "applied"
    ALREADY = "already"  # the portal already showed the change when re-read
    FAILED = "failed"  # terminal error: staff are alerted
    RETRYING = "retrying"
    STAGED = "staged"  # held back by the mass-change guard
    REJECTED = "rejected"  # staff dropped a staged batch
    # Planned by one shard of a sharded full scan: released (or staged) once every shard
    # has planned, when the mass-change guard can count the whole run (worker.scan.shards).
    DEFERRED = "deferred"
    UNAVAILABLE = "unavailable"  # read-only source: cannot be applied
    # The claim's holder died after its portal call may have gone out, and the portal
    # cannot show whether it did: not called again; the finding's hold verifies it.
    UNCONFIRMED = "unconfirmed"
    # Served by another fix of the same kind for the same portal user (coalesced_into):
    # one source refresh per user per hold, however many findings it serves.
    COALESCED = "coalesced"


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    practice: Mapped[str] = mapped_column(String(64), default="default")
    kind: Mapped[str] = mapped_column(String(20))  # full, incremental, adhoc, verify, demo
    scope: Mapped[str] = mapped_column(String(200), default="all")
    status: Mapped[str] = mapped_column(String(20), default="running")
    dry_run: Mapped[bool] = mapped_column(default=False)
    task_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    records_read: Mapped[int] = mapped_column(default=0)
    findings_total: Mapped[int] = mapped_column(default=0)
    findings_new: Mapped[int] = mapped_column(default=0)
    findings_resolved: Mapped[int] = mapped_column(default=0)
    fixes_queued: Mapped[int] = mapped_column(default=0)
    alerts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None]

    __table_args__ = (Index("ix_runs_practice_started", "practice", "started_at"),)


class FindingRow(Base):
    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    practice: Mapped[str] = mapped_column(String(64), default="default")
    fingerprint: Mapped[str] = mapped_column(String(80))
    check: Mapped[str] = mapped_column(String(48))
    severity: Mapped[str] = mapped_column(String(10))
    state: Mapped[str] = mapped_column(String(16))
    cross_system: Mapped[bool] = mapped_column(default=False)
    fix: Mapped[str | None] = mapped_column(String(32))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    contact_id: Mapped[str | None] = mapped_column(String(64))
    portal_user_id: Mapped[str | None] = mapped_column(String(64))
    contact_ids: Mapped[list[Any] | None]
    detail: Mapped[str] = mapped_column(Text, default="")
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    seen_count: Mapped[int] = mapped_column(default=1)
    state_changed_at: Mapped[datetime]
    next_check_at: Mapped[datetime | None]
    fix_attempts: Mapped[int] = mapped_column(default=0)
    resolved_at: Mapped[datetime | None]
    silenced_until: Mapped[datetime | None]
    silenced_by: Mapped[str | None] = mapped_column(String(100))
    silence_reason: Mapped[str | None] = mapped_column(Text)
    last_run_id: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("practice", "fingerprint", name="uq_findings_practice_fingerprint"),
        Index("ix_findings_state_next", "practice", "state", "next_check_at"),
        Index("ix_findings_patient", "practice", "patient_id"),
        Index("ix_findings_contact", "practice", "contact_id"),
    )


class FindingEvent(Base):
    """Every lifecycle transition, with its time and cause: the audit trail."""

    __tablename__ = "finding_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (Index("ix_finding_events_finding", "finding_id", "at"),)


class ActionRow(Base):
    """The action journal: intent before the portal call, outcome after."""

    __tablename__ = "actions"

    id: Mapped[int] = mapped_column(primary_key=True)
    practice: Mapped[str] = mapped_column(String(64), default="default")
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id", ondelete="CASCADE"))
    run_id: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str] = mapped_column(String(120), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime]
    applied_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    # The claim (worker.fixes.claims): the Celery task id that holds it, a token unique to
    # the one execution (a redelivered message keeps its task id), and when it lapses.
    claimed_by: Mapped[str | None] = mapped_column(String(155))
    claim_token: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    # Set, under the claim, just before the portal call: after it the call may have gone
    # out, so a later attempt re-reads instead of calling again.
    called_at: Mapped[datetime | None]
    # When a message for this fix was last sent to the broker (None: never).
    enqueued_at: Mapped[datetime | None]
    # "kind:portal user" for fixes that one call serves for every finding of that user.
    coalesce_key: Mapped[str | None] = mapped_column(String(120))
    coalesced_into: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_actions_status", "practice", "status"),
        Index("ix_actions_coalesce", "practice", "coalesce_key"),
    )


class DigestSent(Base):
    """One row per (recipient, window): written before sending, so a retry never doubles."""

    __tablename__ = "digests_sent"

    id: Mapped[int] = mapped_column(primary_key=True)
    practice: Mapped[str] = mapped_column(String(64), default="default")
    recipient: Mapped[str] = mapped_column(String(254))
    window_key: Mapped[str] = mapped_column(String(120))
    channel: Mapped[str] = mapped_column(String(16), default="email")
    status: Mapped[str] = mapped_column(String(16), default="sending")
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    items: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("practice", "recipient", "window_key", name="uq_digest_window"),
    )


class KeyValue(Base):
    """Small durable facts: scan watermarks, the pause switch, breaker state, heartbeats."""

    __tablename__ = "kv"

    practice: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime]


class DuplicateIndex(Base):
    """What an incremental scan needs to decide duplicate groups without reading every
    contact (worker/scan/duplicate_index.py): the Fellegi-Sunter parameters the last whole
    run of the matcher learned (`model`, JSON) and the blocking keys of every contact it
    read (`keys`, packed by worker.matching.index). `covered_at` is the watermark whose
    changes the keys (with `DuplicateKeyChange`) include; `token` names this build."""

    __tablename__ = "duplicate_index"

    practice: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[str] = mapped_column(String(32))
    built_at: Mapped[datetime]
    covered_at: Mapped[datetime]
    contacts: Mapped[int] = mapped_column(default=0)
    model: Mapped[dict[str, Any]] = mapped_column(default=dict)
    keys: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime]


class DuplicateKeyChange(Base):
    """A contact's blocking keys as an incremental scan last read them (`keys` None: the
    contact is gone), applied over `DuplicateIndex.keys` until the next whole run."""

    __tablename__ = "duplicate_key_changes"

    practice: Mapped[str] = mapped_column(String(64), primary_key=True)
    contact_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    keys: Mapped[list[Any] | None]
    updated_at: Mapped[datetime]


class StaffUser(Base):
    """A staff account of the web console. Only an argon2 hash of the password is kept;
    `session_version` changes with the password or role, so old session cookies die."""

    __tablename__ = "staff_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    practice: Mapped[str] = mapped_column(String(64), default="default")
    username: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))  # viewer | operator
    password_hash: Mapped[str] = mapped_column(String(255))
    session_version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime]
    password_changed_at: Mapped[datetime]
    last_login_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("practice", "username", name="uq_staff_users_practice_username"),
    )


class AuditEntry(Base):
    """Every operator action in the console: who, what, when, why (ids only)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    practice: Mapped[str] = mapped_column(String(64), default="default")
    at: Mapped[datetime]
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(40))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(120))
    reason: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_audit_log_patient", "practice", "patient_id", "at"),
        Index("ix_audit_log_at", "practice", "at"),
    )
