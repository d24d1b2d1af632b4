"""The CSV and SQL layouts of DESIGN.md, in one place.

Operators' scripts rely on these exact names and orders: the same names are the table
and column names of the SQL source.
"""

from __future__ import annotations

OP_LAYOUT: dict[str, tuple[str, ...]] = {
    "patients": ("patient_id", "first_name", "last_name", "dob", "email", "status", "updated_at"),
    "contacts": (
        "contact_id", "first_name", "last_name", "email", "dob", "phone", "address", "city",
        "postcode", "active", "patient_id", "updated_at",
    ),
    "family_contacts": ("patient_id", "contact_id", "role_reason", "authority", "updated_at"),
}

PORTAL_LAYOUT: dict[str, tuple[str, ...]] = {
    "portal_users": (
        "user_id", "op_patient_id", "op_contact_id", "first_name", "last_name", "email", "role",
        "active", "updated_at",
    ),
    "portal_links": ("caregiver_user_id", "dependent_user_id", "created_at"),
    "portal_sources": ("user_id", "status", "last_sync_at"),
    "portal_audit": ("at", "action", "user_id", "email"),
}


def csv_name(table: str) -> str:
    return f"{table}.csv"
