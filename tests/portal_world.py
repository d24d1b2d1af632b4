"""A small portal shared by the simulator and HTTP client tests: two families, one
missing link and one stale link, Welcome events old and new."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from worker.model.records import WELCOME_ACTION, AuditEvent, CaregiverLink, PortalSource, PortalUser

T0 = datetime(2024, 5, 1, 14, 0, tzinfo=UTC)


def portal_records() -> dict[str, list[Any]]:
    """Two families: u-c1 lacks a link to u-p2; u-c2 holds a stale link to u-p3."""
    users = [
        PortalUser("u-c1", None, "c1", "Ann", "Lee", "ann@example.org", "Caregiver", True, T0),
        PortalUser("u-p1", "p1", None, "Kim", "Lee", "p1@dummy.com", "Patient", True, T0),
        PortalUser("u-p2", "p2", None, "Max", "Lee", "max@example.org", "Patient", True, T0),
        PortalUser("u-c2", None, "c2", "Bo", "Ray", "bo@example.org", "Caregiver", True,
                   T0 - timedelta(days=3)),
        PortalUser("u-p3", "p3", None, "Sam", "Ray", "p3@dummy.com", "Patient", True,
                   T0 - timedelta(days=3)),
    ]
    links = [
        CaregiverLink("u-c1", "u-p1", T0 - timedelta(days=30)),
        CaregiverLink("u-c2", "u-p3", T0 - timedelta(days=30)),
    ]
    sources = [
        PortalSource("u-c1", "Connected", T0 - timedelta(days=1)),
        PortalSource("u-c2", "Connected", T0 - timedelta(days=1)),
        PortalSource("u-p1", "Connected", T0 - timedelta(days=1)),
    ]
    audit = [
        AuditEvent(T0 - timedelta(days=10), WELCOME_ACTION, "u-c1", "ann@example.org"),
        AuditEvent(T0 - timedelta(days=2), "Profile: Login", "u-c2", "bo@example.org"),
        AuditEvent(T0 - timedelta(hours=1), WELCOME_ACTION, "u-c2", "bo@example.org"),
    ]
    expected = [("u-c1", "u-p1"), ("u-c1", "u-p2")]  # OP no longer authorizes c2 for p3
    return {"users": users, "links": links, "sources": sources, "audit": audit,
            "expected_links": expected}
