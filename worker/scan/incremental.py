"""Incremental scans: reread what changed since the last scan, and only its neighbourhood.

A full scan reads everything (about a million rows at 100,000 patients). Between two
full scans almost nothing changes, so an incremental scan:

1. reads the changes since the watermark (kv "watermark": when the last successful full
   or incremental scan *started*) minus an overlap of the propagation delay + 5 min, so
   a record that was too recent to compare last time is compared now, and a change
   committed while the last scan was reading is not missed; and the rows deleted since
   the last scan (worker.scan.deletions: row counts first, the id columns of patients,
   contacts and family contacts only when a count says a row went), every id of a
   removed row counting as a change;
2. adds the findings that are due a fresh read whatever changed: `pending` ones past the
   propagation delay (their confirming read) and `held` ones whose hold has ended;
3. widens those ids by one hop to every id whose findings can depend on a changed record
   (a patient's contacts, a contact's charts, a portal user's OP records): these
   **affected** ids are the run's scope, so only findings about them are raised,
   confirmed or resolved;
4. reads the neighbourhood the checks need to decide those findings exactly as a full
   scan would (every family contact of the affected records, the contacts those name and
   theirs in turn, their portal users, links, sources and Welcome events) through the
   adapters' targeted reads (`select_*`; a filtered full stream for adapters without);
5. runs the ordinary `reconcile` on that partial snapshot.

`contact_duplicate`: when contacts changed (deleted ones included), the contacts it
decides are the changed ones and every member of an open group holding one
(`grouped_with`). worker.scan.duplicate_index compares them with every contact of the
practice through the same blocks, with the parameters the last full scan learned, from
the blocking keys that scan kept: it reads by id only them and their candidates (the
whole contacts table and the whole matcher only when no usable index is kept). It keeps
the groups holding one of those (`Snapshot.duplicate_findings`), and the scope decides
exactly the groups that hold one (`Scope.duplicate_contact_ids`): a new group is raised,
a group that no longer holds, grew or shrank is resolved, groups of unchanged contacts
nearby are left alone. With no contact changed, the check is skipped.

What it leaves to the nightly full scan (docs/benchmarks.md): portal links added or
removed by hand (links carry no change time; our own fixes are verified through their
hold), and silences that expired.
tests/scan/test_incremental.py shows that after random changes, deletions among them,
an incremental scan leaves the same open findings as a full scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from worker.model.records import (
    WELCOME_ACTION,
    AuditEvent,
    CaregiverLink,
    Contact,
    FamilyContact,
    InvalidRecord,
    Patient,
    PortalSource,
    PortalUser,
)
from worker.model.scope import Scope, for_contact, for_patient
from worker.model.snapshot import FileShares, FileTally, Snapshot, shares_over
from worker.scan import duplicate_index
from worker.scan.deletions import TABLES, DeletionWatch, Removed
from worker.scan.engine import Deps, RunResult, ScopeRequest, reconcile, utcnow
from worker.scan.lifecycle import SyncResult
from worker.scan.locks import Ceded, StaleRead
from worker.scan.planner import Plan
from worker.sources.tables import ID_COLUMNS, ID_SEP
from worker.state.db import kv_get, kv_set
from worker.state.models import FindingRow, Run
from worker.state.models import FindingState as S

log = structlog.get_logger(__name__)

# A practice scan's write phase (worker.scan.locks.practice_write, bound to its read time).
WriteSection = Callable[[], AbstractContextManager[Ceded | None]]
# A family run's (worker.scan.locks.family_write): its read time and its scope.
FamilyGuard = Callable[[float, Scope], AbstractContextManager[None]]

WATERMARK = "watermark"
OVERLAP_SLACK = timedelta(minutes=5)
# Checks that need the whole practice, not a neighbourhood: skipped unless contacts
# changed (then decided through the kept duplicate index: worker.scan.duplicate_index).
FULL_SCAN_ONLY = frozenset({"contact_duplicate"})


def overlap(settings: Any) -> timedelta:
    """How far before the watermark changes are reread: the propagation delay (records
    too recent to compare at the last scan) plus slack for clocks and slow commits."""
    return settings.propagation_delay + OVERLAP_SLACK


# -- the watermark ---------------------------------------------------------------------


def read_watermark(session: Session, practice: str) -> dict[str, Any] | None:
    return kv_get(session, practice, WATERMARK)


def record_scan(deps: Deps, now: datetime, result: RunResult, patients: int | None,
                also: duplicate_index.Persist | None = None) -> None:
    """After a successful full or incremental scan: move the watermark to its start.

    An incremental scan also counts as a successful scan of everything for the dead-man's
    switch (kv "last_success"): it looked at every record that changed. `patients` (the
    practice's size, known after a full read) is kept for the mass-change guard of later
    incremental runs, whose snapshots hold only a neighbourhood. `also` writes in the
    same transaction (the kept duplicate index, which must cover this watermark).
    """
    if result.dry_run or result.run_id is None:
        return
    practice = deps.settings.practice
    with deps.sessions() as session, session.begin():
        if also is not None:
            also(session)
        previous = read_watermark(session, practice) or {}
        kv_set(session, practice, WATERMARK, {
            "at": now.isoformat(), "run_id": result.run_id, "kind": result.kind,
            "patients": patients if patients is not None else previous.get("patients"),
        }, now)
        if not result.scope.is_all:
            kv_set(session, practice, "last_success", {
                "at": now.isoformat(), "run_id": result.run_id, "kind": result.kind,
            }, now)


def full_reconcile(
    deps: Deps, now: datetime | None = None, *, task_id: str | None = None, kind: str = "full",
    write_section: WriteSection | None = None,
) -> RunResult:
    """A full-scope scan that also sets the watermark incremental scans start from, and
    keeps the ids of the OP rows it read for the next incremental scan to compare with
    (worker.scan.deletions) and what its duplicate matcher learned
    (worker.scan.duplicate_index)."""
    now = now or utcnow()
    with deps.sessions() as session:
        watch = DeletionWatch(session, deps.settings.practice)
    result = reconcile(deps, ScopeRequest(), kind=kind, now=now, task_id=task_id,
                       keep_op_ids=True, write_section=write_section,
                       keep_duplicate_index=True)
    learned, result.learned_duplicates = result.learned_duplicates, None
    record_scan(deps, now, result, result.counts.get("patients"),
                duplicate_index.save_learned(learned, deps.settings.practice, now)
                if learned is not None else None)
    if not result.dry_run and result.op_ids is not None:
        watch.from_snapshot(deps.sessions, result.op_ids)
        watch.keep(deps.sessions, now)
    result.op_ids = None
    return result


# -- targeted reads ---------------------------------------------------------------------


def _ids(values: Iterable[str | None]) -> set[str]:
    return {v for v in values if v}


class Reads:
    """The targeted reads an incremental scan makes, with the number of rows they cost.

    Adapters with `select_*` / `read_changed` methods (CSV, SQL, the portal's HTTP API)
    answer them directly; for any other adapter the table is streamed and filtered.
    """

    def __init__(self, op: Any, portal: Any) -> None:
        self.op = op
        self.portal = portal
        self.rows = 0

    def counted(self, records: Iterable[Any]) -> Iterator[Any]:
        """A whole table, streamed and counted (the duplicate pool)."""
        return self._count(records)

    def _count(self, records: Iterable[Any]) -> Iterator[Any]:
        for record in records:
            self.rows += 1
            yield record

    def changed(self, reader: Any, table: str, method: str, since: datetime) -> Iterator[Any]:
        fast = getattr(reader, "read_changed", None)
        records = fast(table, since) if fast is not None else getattr(reader, method)(since)
        return self._count(records)

    def _select(
        self, reader: Any, method: str, full: Callable[[], Iterable[Any]],
        keep: Callable[[Any], bool], **ids: Collection[str],
    ) -> Iterator[Any]:
        if not any(ids.values()):
            return iter(())
        fast = getattr(reader, method, None)
        if fast is not None:
            return self._count(fast(**ids))
        return (r for r in self._count(full()) if keep(r))

    def ids(self, table: str) -> set[str]:
        """Every row id of an OP table (`read_ids`; ids taken from a full stream for
        adapters without it)."""
        fast = getattr(self.op, "read_ids", None)
        if fast is not None:
            return set(self._count(fast(table)))
        columns = ID_COLUMNS[table]
        out: set[str] = set()
        for record in self._count(getattr(self.op, table)()):
            if not isinstance(record, InvalidRecord):
                out.add(ID_SEP.join(getattr(record, c) for c in columns))
        return out

    def count(self, table: str) -> int:
        """Rows in an OP table (`count_rows`; a full stream for adapters without)."""
        fast = getattr(self.op, "count_rows", None)
        if fast is not None:
            return int(fast(table))
        return sum(1 for _ in self._count(getattr(self.op, table)()))

    def patients(self, ids: Collection[str]) -> Iterator[Any]:
        return self._select(self.op, "select_patients", self.op.patients,
                            lambda r: r.patient_id in ids, ids=ids)

    def contacts(
        self, ids: Collection[str] = (), patient_ids: Collection[str] = (),
        emails: Collection[str] = (), phones: Collection[str] = (),
        dobs: Collection[str] = (),
    ) -> Iterator[Any]:
        def keep(r: Any) -> bool:
            if r.contact_id in ids or r.patient_id in patient_ids:
                return True
            return isinstance(r, Contact) and (
                r.email.strip().lower() in emails or r.phone.strip() in phones
                or (r.dob is not None and r.dob.isoformat() in dobs))

        keys: dict[str, Collection[str]] = {"ids": ids, "patient_ids": patient_ids,
                                            "emails": emails}
        if phones or dobs:  # only family-scoped runs ask: keep older adapters working
            keys.update(phones=phones, dobs=dobs)
        return self._select(self.op, "select_contacts", self.op.contacts, keep, **keys)

    def family_contacts(
        self, patient_ids: Collection[str] = (), contact_ids: Collection[str] = ()
    ) -> Iterator[Any]:
        return self._select(
            self.op, "select_family_contacts", self.op.family_contacts,
            lambda r: r.patient_id in patient_ids or r.contact_id in contact_ids,
            patient_ids=patient_ids, contact_ids=contact_ids,
        )

    def users(
        self, ids: Collection[str] = (), patient_ids: Collection[str] = (),
        contact_ids: Collection[str] = (), changed_since: datetime | None = None,
    ) -> Iterator[Any]:
        """Users by id or OP id, and (`changed_since`) those changed since: one read."""
        def keep(r: Any) -> bool:
            if isinstance(r, PortalUser):
                return (r.user_id in ids or r.op_patient_id in patient_ids
                        or r.op_contact_id in contact_ids
                        or (changed_since is not None
                            and (r.updated_at is None or r.updated_at >= changed_since)))
            return (changed_since is not None or r.portal_user_id in ids
                    or r.patient_id in patient_ids or r.contact_id in contact_ids)

        if changed_since is None:
            return self._select(self.portal, "select_users", self.portal.users, keep,
                                ids=ids, patient_ids=patient_ids, contact_ids=contact_ids)
        fast = getattr(self.portal, "select_users", None)
        if fast is not None:
            return self._count(fast(ids=ids, patient_ids=patient_ids,
                                    contact_ids=contact_ids, changed_since=changed_since))
        return (r for r in self._count(self.portal.users()) if keep(r))

    def links(self, user_ids: Collection[str]) -> Iterator[Any]:
        def keep(r: Any) -> bool:
            if isinstance(r, CaregiverLink):
                return r.caregiver_user_id in user_ids or r.dependent_user_id in user_ids
            return (r.portal_user_id in user_ids
                    or r.extra.get("dependent_user_id") in user_ids)

        return self._select(self.portal, "select_links", self.portal.links, keep,
                            user_ids=user_ids)

    def sources(self, user_ids: Collection[str]) -> Iterator[Any]:
        def keep(r: Any) -> bool:
            uid = r.user_id if isinstance(r, PortalSource) else r.portal_user_id
            return uid in user_ids

        return self._select(self.portal, "select_sources", self.portal.sources, keep,
                            user_ids=user_ids)


# -- what changed, and what it affects ---------------------------------------------------


@dataclass
class Ids:
    patients: set[str] = field(default_factory=set)
    contacts: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.patients or self.contacts or self.users)

    def add_record(self, record: Any) -> None:
        """The ids a changed (or unreadable) row names."""
        match record:
            case Patient():
                self.patients.add(record.patient_id)
            case Contact():
                self.contacts.add(record.contact_id)
            case FamilyContact():
                self.patients.add(record.patient_id)
                self.contacts.add(record.contact_id)
            case PortalUser():
                self.users.add(record.user_id)
                self.patients |= _ids([record.op_patient_id])
                self.contacts |= _ids([record.op_contact_id])
            case InvalidRecord():
                self.patients |= _ids([record.patient_id])
                self.contacts |= _ids([record.contact_id])
                self.users |= _ids([record.portal_user_id,
                                    record.extra.get("dependent_user_id")])
                for patient, contact, user, dependent in record.recovered:
                    self.patients |= _ids([patient])
                    self.contacts |= _ids([contact])
                    self.users |= _ids([user, dependent])

    def update(self, other: Ids) -> None:
        self.patients |= other.patients
        self.contacts |= other.contacts
        self.users |= other.users


@dataclass
class Changes:
    ids: Ids = field(default_factory=Ids)
    # Patients and contacts whose OP rows changed (not those a changed user names).
    op_patients: set[str] = field(default_factory=set)
    op_contacts: set[str] = field(default_factory=set)
    # The portal users read so far (changed ones, and those of changed OP records).
    users: dict[str, PortalUser] = field(default_factory=dict)
    # Welcome emails sent since the watermark, or that left the window since then.
    emails: set[str] = field(default_factory=set)
    # Audit rows inside the window (Welcome events and unreadable rows), kept to build
    # the snapshot: the only audit rows a check can use.
    audit: list[Any] = field(default_factory=list)
    # OP rows deleted since the last scan (their ids are among `ids`).
    removed: Removed = field(default_factory=Removed)
    # The changed OP rows read, readable or not: what the scan measures the files by.
    tally: FileTally = field(default_factory=FileTally)


def read_changes(
    reads: Reads, since: datetime, now: datetime, window: timedelta,
    deleted: Callable[[dict[str, list[Any]]], Removed] | None = None,
) -> Changes:
    """What changed since `since`. `deleted`, given the changed OP rows per table, says
    which ids rows deleted since the last scan named (worker.scan.deletions): they
    count as changed OP rows, so the portal users pointing at a deleted patient or
    contact are read with the others."""
    out = Changes()
    changed: dict[str, list[Any]] = {}
    for table, method in (("patients", "patients"), ("contacts", "contacts"),
                          ("family_contacts", "family_contacts")):
        rows = changed[table] = list(reads.changed(reads.op, table, method, since))
        for record in rows:
            out.ids.add_record(record)
            out.tally.add(table, record)
    if deleted is not None:
        out.removed = deleted(changed)
        out.ids.patients |= out.removed.patients
        out.ids.contacts |= out.removed.contacts
    # Changed portal users, and in the same read the users of changed OP records
    # (a new OP contact settles portal_orphan_user of the user pointing at it).
    out.op_patients, out.op_contacts = set(out.ids.patients), set(out.ids.contacts)
    for user in reads.users(patient_ids=out.op_patients, contact_ids=out.op_contacts,
                            changed_since=since):
        if not isinstance(user, PortalUser):
            out.ids.add_record(user)
            continue
        out.users.setdefault(user.user_id, user)
        if user.updated_at is None or user.updated_at >= since:
            out.ids.add_record(user)
        else:
            out.ids.users.add(user.user_id)
    # One audit read serves both: Welcome events since the watermark, and those that
    # fell out of the window since the last scan (`since - window` .. `now - window`).
    horizon = now - window
    for event in reads.changed(reads.portal, "portal_audit", "audit", since - window):
        if isinstance(event, InvalidRecord):
            out.ids.add_record(event)
            out.audit.append(event)
            continue
        if event.action != WELCOME_ACTION or not event.email:
            continue
        if event.at >= since or event.at < horizon:
            out.emails.add(event.email.strip().lower())
        if event.at >= horizon:
            out.audit.append(event)
    return out


def due_ids(session: Session, practice: str, now: datetime, delay: timedelta) -> Ids:
    """Ids of findings due a fresh read whatever changed: pending ones past the
    propagation delay, held ones past their hold."""
    rows = session.execute(
        select(FindingRow.patient_id, FindingRow.contact_id, FindingRow.portal_user_id,
               FindingRow.contact_ids)
        .where(
            FindingRow.practice == practice,
            or_(
                and_(FindingRow.state == S.PENDING, FindingRow.first_seen_at <= now - delay),
                and_(FindingRow.state == S.HELD, FindingRow.next_check_at <= now),
            ),
        )
    )
    out = Ids()
    for patient_id, contact_id, user_id, contact_ids in rows:
        out.patients |= _ids([patient_id])
        out.contacts |= _ids([contact_id, *(contact_ids or ())])
        out.users |= _ids([user_id])
    return out


def grouped_with(deps: Deps, practice: str, contacts: set[str]) -> set[str]:
    """`contacts` and every member of an unresolved duplicate group holding one of them:
    when a member is deleted or changes, the rest of its group is decided again (the
    group may shrink to a new one that holds no changed contact)."""
    out = set(contacts)
    with deps.sessions() as session:
        for ids in session.scalars(select(FindingRow.contact_ids).where(
            FindingRow.practice == practice, FindingRow.check == "contact_duplicate",
            FindingRow.state != S.RESOLVED,
        )):
            if ids and not out.isdisjoint(ids):
                out |= set(ids)
    return out


def affected(reads: Reads, changes: Changes) -> Ids:
    """Every id whose findings may depend on a changed record: the run's scope.

    A patient's change can settle a finding about a contact on their chart
    (contact_email_invalid, welcome_not_sent look at whether the chart is active), a
    contact's one about the charts they are on (patient_email_present), a new patient or
    contact one about the portal users pointing at it (portal_orphan_user, read with the
    changes), a Welcome email one about the contact with that address.
    """
    out = Ids()
    out.update(changes.ids)
    p0, c0 = changes.op_patients, changes.op_contacts
    for fc in reads.family_contacts(patient_ids=p0, contact_ids=c0):
        out.add_record(fc)
    for contact in reads.contacts(patient_ids=p0, emails=changes.emails):
        out.contacts |= _ids([contact.contact_id])
    return out


# -- the neighbourhood ----------------------------------------------------------------------


def neighbourhood(
    reads: Reads, scope: Ids, audit: list[Any], known: dict[str, PortalUser]
) -> Snapshot:
    """A snapshot holding every record the checks look at to decide a finding about a
    scope id, so each such finding comes out exactly as in a full scan.

    `known`: portal users already read (with the changes), to spare a read for them.
    """
    records: list[Any] = []

    # The OP records of the scope's portal users are where their findings start.
    scope_users = {uid: known[uid] for uid in scope.users if uid in known}
    missing = scope.users - set(scope_users)
    for u in reads.users(ids=missing):
        if isinstance(u, PortalUser):
            scope_users.setdefault(u.user_id, u)
    seed_p = scope.patients | _ids(u.op_patient_id for u in scope_users.values())
    seed_c = scope.contacts | _ids(u.op_contact_id for u in scope_users.values())

    # OP: the seeds' contacts and every family contact of them, then the contacts those
    # name with all of theirs (two hops), then every chart any of them is on or is.
    contacts: dict[str, Any] = {}

    def take_contacts(found: Iterable[Any]) -> None:
        for c in found:
            records.append(c)
            if isinstance(c, Contact):
                contacts.setdefault(c.contact_id, c)

    take_contacts(reads.contacts(ids=seed_c, patient_ids=seed_p))
    first_hop = set(contacts) | seed_c
    family: list[Any] = list(reads.family_contacts(patient_ids=seed_p, contact_ids=first_hop))
    # The whole family of every chart a first-hop contact is on: a portal fix for such a
    # chart waits for any OP-side problem on it (worker.checks.rootcause), e.g. another
    # contact's row there. Rows of first-hop contacts were read above.
    family_charts = _ids(f.patient_id for f in family) - seed_p
    family.extend(f for f in reads.family_contacts(patient_ids=family_charts)
                  if isinstance(f, FamilyContact) and f.contact_id not in first_hop)
    second_hop = _ids(f.contact_id for f in family) - first_hop
    # Later reads keep only good rows: a bad row of a neighbour is no finding of this
    # scope's, and one read twice would be reported twice.
    take_contacts(r for r in reads.contacts(ids=second_hop) if isinstance(r, Contact))
    for f in reads.family_contacts(contact_ids=second_hop):
        # Rows on a seed chart or of a first-hop contact were read above.
        if (f.patient_id not in seed_p and f.patient_id not in family_charts
                and f.contact_id not in first_hop):
            family.append(f)
    records.extend(family)
    charts = seed_p | _ids(f.patient_id for f in family)
    charts |= _ids(c.patient_id for c in contacts.values())
    patients = set()
    for p in reads.patients(charts):
        records.append(p)
        if isinstance(p, Patient):
            patients.add(p.patient_id)

    # Portal: the scope's users and those of every loaded record, their links, the
    # users at the other end.
    users: dict[str, PortalUser] = {}
    for u in reads.users(ids=scope.users, patient_ids=patients, contact_ids=set(contacts)):
        records.append(u)
        if isinstance(u, PortalUser):
            users.setdefault(u.user_id, u)
    links = list(reads.links(set(users)))
    records.extend(links)
    ends = _ids(end for link in links if isinstance(link, CaregiverLink)
                for end in (link.caregiver_user_id, link.dependent_user_id)) - set(users)
    for u in reads.users(ids=ends):
        if isinstance(u, PortalUser):
            records.append(u)
            users.setdefault(u.user_id, u)
    # The OP records those users point at (only the records: orphan and link checks ask
    # whether they exist and who they are, never for their neighbours).
    refs_p = _ids(u.op_patient_id for u in users.values()) - patients
    refs_c = _ids(u.op_contact_id for u in users.values()) - set(contacts)
    records.extend(r for r in reads.patients(refs_p) if isinstance(r, Patient))
    take_contacts(r for r in reads.contacts(ids=refs_c) if isinstance(r, Contact))
    records.extend(reads.sources(set(users)))

    emails = {c.email.strip().lower() for c in contacts.values() if c.email.strip()}
    for event in audit:
        if isinstance(event, AuditEvent):
            if event.email.strip().lower() in emails:
                records.append(event)
        elif event.portal_user_id in users:
            records.append(event)
    return Snapshot.build(records)


# -- family-scoped runs (on-call, verify) -----------------------------------------------

# Rounds of the exact-key duplicate candidates' closure (`duplicate_candidates`, used
# without a kept index): each reads the keys of the contacts a group newly reached.
DUPLICATE_ROUNDS = 3


def family_snapshot(reads: Reads, seeds: Ids, now: datetime, window: timedelta) -> Snapshot:
    """What a run about a few families reads: their neighbourhood (as an incremental
    scan reads it) and the Welcome events of the window. `contact_duplicate` is decided
    apart (`family_duplicates`)."""
    audit = [e for e in reads.changed(reads.portal, "portal_audit", "audit", now - window)
             if isinstance(e, InvalidRecord) or (e.action == WELCOME_ACTION and e.email)]
    return neighbourhood(reads, seeds, audit, {})


def family_view(reads: Reads, patient_id: str, now: datetime, window: timedelta) -> Snapshot:
    """One patient's family as an on-call run reads it (their chart, its contacts, their
    portal users, links and sources), for a page or a `--local` run that shows one family:
    a targeted read, never the practice (`reads.rows` counts what it cost)."""
    seeds = _whole_family(reads, Ids(patients={patient_id}))
    return family_snapshot(reads, seeds, now, window)


def contact_charts(reads: Reads, contact_id: str) -> list[str]:
    """The charts a contact is on (or is the patient of), from a targeted read."""
    return sorted(_whole_family(reads, Ids(contacts={contact_id})).patients)


def _family(snap: Snapshot, seeds: Ids) -> set[str]:
    """The contacts on the seed charts and those who are the seed patients."""
    out = {fc.contact_id for p in seeds.patients for fc in snap.fc_by_patient.get(p, ())}
    out |= {c.contact_id for p in seeds.patients
            for c in snap.contacts_by_patient_id.get(p, ())}
    return out


def family_duplicates(
    deps: Deps, reads: Reads, snap: Snapshot, seeds: Ids, scope: Scope,
    said: set[str] | None = None,
) -> tuple[Scope, str]:
    """Decide `contact_duplicate` for a family run's contacts; returns the run's scope
    and a line for its trace.

    The contacts compared: the seeds', those on the seed charts (their groups are
    blockers that hold back a fix on those charts: worker.checks.rootcause) and every
    member of an open group holding a scope contact (the group may have shrunk to one
    without it). With a usable kept index they are compared with every contact of the
    practice through it, with the last full scan's parameters
    (worker.scan.duplicate_index.decide_family): the groups holding a scope contact are
    the full scan's, so the run raises and resolves them (`Scope.duplicate_contact_ids`),
    like an incremental scan. Without one (the reason is logged once per run: `said`),
    contacts sharing an exact email, phone or DOB are read instead
    (`duplicate_candidates`) and the run resolves no group it did not see
    (`Scope.keep_unseen`)."""
    practice = deps.settings.practice
    own = grouped_with(deps, practice, set(scope.contact_ids))
    family = seeds.contacts | _family(snap, seeds)
    focus = own | family
    with deps.sessions() as session:
        mark = read_watermark(session, practice) or {}
    mark_at = datetime.fromisoformat(mark["at"]) if mark.get("at") else None
    known = [snap.contacts[c] for c in sorted(focus) if c in snap.contacts]
    dup = duplicate_index.decide_family(deps, reads, focus, mark_at, known)
    if isinstance(dup, str):
        if said is None or dup not in said:
            log.info("duplicates_family_fallback", reason=dup, focus=len(family))
            if said is not None:
                said.add(dup)
        rows = reads.rows
        for contact in duplicate_candidates(reads, snap, family):
            snap.add(contact)
        return replace(scope, keep_unseen=FULL_SCAN_ONLY), (
            f"contact_duplicate: {dup}, so only contacts sharing an email, a phone or a date "
            f"of birth as written with the family's were compared ({reads.rows - rows} "
            "row(s) read); a group only a full scan sees is neither raised nor resolved")
    snap.duplicate_findings = dup.findings
    decided = set(own)
    for f in dup.findings:
        if not own.isdisjoint(f.contact_ids or ()):
            decided.update(f.contact_ids or ())
    return replace(scope, duplicate_contact_ids=frozenset(decided), keep_unseen=frozenset()
                   ), dup.trace


def duplicate_candidates(reads: Reads, snap: Snapshot, seeds: set[str]) -> list[Contact]:
    """Without a kept index: contacts not in `snap` that the duplicate check could group
    with a seed contact, read by exact keys.

    This reads the contacts sharing a seed's email, phone or date of birth (as written),
    then the same for every contact a group reaches, until no group grows, and the whole
    matcher runs on that small pool. What it misses (the same phone written differently,
    an address alone, a DOB typo) the next full scan finds; the run does not resolve a
    duplicate it did not see (`Scope.keep_unseen`), and its probabilities are the small
    pool's, not the practice's."""
    from worker.matching.duplicates import find_duplicate_groups, normalise_email, normalise_phone

    pool: dict[str, Contact] = dict(snap.contacts)
    keyed: set[str] = set()
    frontier = set(seeds)
    added: list[Contact] = []
    for _ in range(DUPLICATE_ROUNDS):
        todo = [pool[c] for c in sorted(frontier - keyed) if c in pool]
        if not todo:
            break
        keyed |= {c.contact_id for c in todo}
        emails = {c.email.strip().lower() for c in todo if normalise_email(c.email)}
        phones = {c.phone.strip() for c in todo if normalise_phone(c.phone)}
        dobs = {c.dob.isoformat() for c in todo if c.dob is not None and c.dob.year > 1900}
        for r in reads.contacts(emails=emails, phones=phones, dobs=dobs):
            if isinstance(r, Contact) and r.contact_id not in pool:
                pool[r.contact_id] = r
                added.append(r)
        frontier = set()
        for group in find_duplicate_groups(pool.values()):
            members = set(group.contact_ids)
            if members & (seeds | keyed):
                frontier |= members
    return added


def family_reconcile(
    deps: Deps, seeds: Ids, request: ScopeRequest, *, kind: str, guard: FamilyGuard,
    scope: Scope | None = None, now: datetime | None = None, task_id: str | None = None,
    dry_run: bool = False, attempts: int = 3,
) -> RunResult:
    """A run about a few families (an on-call `--patient`/`--contact` run, the verify
    tick): reads only their neighbourhood (`family_snapshot`), then folds the result into
    the state database inside `guard` (worker.scan.locks.family_write: the short state
    write lock, never the practice's scan lock). When a practice scan committed a newer
    read meanwhile (StaleRead) the family is read again, up to `attempts` times.

    `scope` is fixed (verify); else it is the patient's or contact's, as in a full read.
    """
    settings = deps.settings
    said: set[str] = set()  # duplicate fallback reasons logged (once per run)
    for attempt in range(1, attempts + 1):
        at = now or utcnow()
        read_at = time.time()
        t0 = time.perf_counter()
        reads = Reads(deps.op, deps.portal)
        family = seeds if scope is not None else _whole_family(reads, seeds)
        snap = family_snapshot(reads, family, at, settings.welcome_window)
        run_scope, dup_trace = (scope, None) if scope is not None else family_duplicates(
            deps, reads, snap, family, _family_scope(snap, request), said)
        t_read = time.perf_counter() - t0
        try:
            with guard(read_at, run_scope):
                result = reconcile(deps, request, kind=kind, now=at, task_id=task_id,
                                   snapshot=snap, scope_override=run_scope, dry_run=dry_run)
        except StaleRead:
            log.info("family_read_stale", attempt=attempt, scope=request.label)
            continue
        result.rows_read = reads.rows
        result.read_seconds += t_read
        result.total_seconds += t_read
        result.trace.insert(0, f"family-scoped: {reads.rows} row(s) read in {t_read:.2f}s "
                               f"(the family's neighbourhood, not the practice)")
        if dup_trace is not None:
            result.trace.insert(1, dup_trace)
        log.info("family_scan", run_id=result.run_id, kind=kind, rows_read=reads.rows,
                 snapshot_records=snap.records, seconds=round(time.perf_counter() - t0, 3))
        return result
    raise StaleRead(f"practice scans kept committing newer reads ({attempts} attempts)")


def _whole_family(reads: Reads, seeds: Ids) -> Ids:
    """The ids a patient's or contact's scope covers (worker.model.scope.for_patient /
    for_contact): the patient and every contact on their chart or who is them; the
    contact, every chart they are on and their own. The neighbourhood of all of them is
    what decides each finding the scope reports exactly as a full read would."""
    out = Ids(set(seeds.patients), set(seeds.contacts), set(seeds.users))
    for fc in reads.family_contacts(patient_ids=seeds.patients, contact_ids=seeds.contacts):
        if isinstance(fc, FamilyContact):
            if fc.patient_id in seeds.patients:
                out.contacts.add(fc.contact_id)
            if fc.contact_id in seeds.contacts:
                out.patients.add(fc.patient_id)
    for c in reads.contacts(ids=seeds.contacts, patient_ids=seeds.patients):
        if isinstance(c, Contact):
            if c.patient_id in seeds.patients:
                out.contacts.add(c.contact_id)
            if c.contact_id in seeds.contacts and c.patient_id:
                out.patients.add(c.patient_id)
    return out


def _family_scope(snap: Snapshot, request: ScopeRequest) -> Scope:
    base = (for_patient(snap, request.target or "") if request.kind == "patient"
            else for_contact(snap, request.target or ""))
    return replace(base, keep_unseen=FULL_SCAN_ONLY)


def family_seeds(request: ScopeRequest) -> Ids:
    if request.kind == "patient" and request.target:
        return Ids(patients={request.target})
    if request.kind == "contact" and request.target:
        return Ids(contacts={request.target})
    raise ValueError(f"not a family scope: {request.label}")


# -- the scan -----------------------------------------------------------------------------


def incremental_reconcile(
    deps: Deps, now: datetime | None = None, *, task_id: str | None = None,
    write_section: WriteSection | None = None,
) -> RunResult:
    """Reconcile what changed since the last scan (module docstring), or everything when
    no scan has set a watermark yet."""
    settings = deps.settings
    practice = settings.practice
    now = now or utcnow()
    t0 = time.perf_counter()
    with deps.sessions() as session:
        mark = read_watermark(session, practice)
        due = due_ids(session, practice, now, settings.propagation_delay)
        watch = DeletionWatch(session, practice)
    if mark is None or not mark.get("at"):
        log.info("incremental_scan_without_watermark", practice=practice)
        return full_reconcile(deps, now, task_id=task_id, kind="incremental",
                              write_section=write_section)

    since = datetime.fromisoformat(mark["at"]) - overlap(settings)
    reads = Reads(deps.op, deps.portal)
    sizes: dict[str, int] = {}

    def deleted(changed: dict[str, list[Any]]) -> Removed:
        # Counted after the changed rows were read: a row added meanwhile makes the
        # counts disagree, which costs an id read, never a missed deletion.
        counts = {t: reads.count(t) for t in TABLES}
        sizes.update(counts)
        return watch.check(reads, deps.sessions, changed, counts)

    changes = read_changes(reads, since, now, settings.welcome_window, deleted)
    removed = changes.removed
    files = measured_files(changes.tally, sizes)
    over = shares_over(files.shares, settings.unreadable_alert_percent,
                       settings.unreadable_alert_min_rows)
    mark_at = datetime.fromisoformat(mark["at"])
    if not changes.ids and not changes.emails and not due and not over:
        result = _nothing_changed(deps, now, since, reads.rows, time.perf_counter() - t0,
                                  task_id, duplicate_index.keep_current(deps, mark_at, now))
        if watch.read_ids:
            result.trace.append(_ids_read(removed))
        watch.keep(deps.sessions, now)
        return result

    scope_ids = affected(reads, changes)
    scope_ids.update(due)
    snap = neighbourhood(reads, scope_ids, changes.audit, changes.users)
    excluded, duplicate_ids = FULL_SCAN_ONLY, frozenset[str]()
    dup: duplicate_index.Decision | None = None
    if changes.op_contacts or due.contacts:
        # Contacts changed (or a finding about contacts is due its confirming read):
        # compare them with every contact of the practice through the same blocks, as a
        # full scan does (worker.scan.duplicate_index).
        focus = grouped_with(deps, practice, changes.op_contacts | due.contacts)
        dup = duplicate_index.decide(deps, reads, focus, mark_at, now)
        snap.duplicate_findings = dup.findings
        duplicate_ids = dup.decided
        excluded = frozenset()
    t_read = time.perf_counter() - t0
    label = (f"changed since {since.isoformat(timespec='seconds')}: "
             f"{len(scope_ids.patients)}p/{len(scope_ids.contacts)}c/{len(scope_ids.users)}u")
    scope = Scope(
        "entities", label, frozenset(scope_ids.patients), frozenset(scope_ids.contacts),
        frozenset(scope_ids.users), exclude_checks=excluded,
        duplicate_contact_ids=duplicate_ids, files=frozenset(over),
    )
    result = reconcile(
        deps, ScopeRequest("entities", label), kind="incremental", now=now, task_id=task_id,
        snapshot=snap, scope_override=scope,
        population=max(int(mark.get("patients") or 0), len(snap.patients)),
        write_section=write_section, files=files,
    )
    result.read_seconds += t_read
    result.total_seconds += t_read
    result.trace.insert(0, f"incremental: {reads.rows} row(s) read in {t_read:.2f}s for "
                           f"{len(scope_ids.patients)} patient(s), {len(scope_ids.contacts)} "
                           f"contact(s) and {len(scope_ids.users)} portal user(s) affected")
    if watch.read_ids:
        result.trace.insert(1, _ids_read(removed))
    if dup is not None:
        result.trace.insert(1, dup.trace)
    record_scan(deps, now, result, None, dup.persist if dup is not None
                else duplicate_index.keep_current(deps, mark_at, now))
    watch.keep(deps.sessions, now)
    log.info("incremental_scan", run_id=result.run_id, rows_read=reads.rows,
             snapshot_records=snap.records, affected_patients=len(scope_ids.patients),
             affected_contacts=len(scope_ids.contacts), affected_users=len(scope_ids.users),
             seconds=round(time.perf_counter() - t0, 3))
    return result


def measured_files(tally: FileTally, sizes: dict[str, int]) -> FileShares:
    """The unreadable share of each OP file as far as an incremental scan can tell: the
    unreadable rows among those it read as changed (a row whose time cannot be read is
    always among them; one with an old readable time was reported by the scan that
    first read it) against the file's row count, which it takes anyway to notice
    deletions (`count_rows`; an export's count leaves out lines that do not split into
    the header's fields, so when those outnumber it the unreadable rows are added). It
    sees only some of a file's unreadable rows: the share it finds is a lower bound."""
    shares = tally.shares(table for table in TABLES if table in sizes)
    shares.shares = {table: (bad, sizes[table] if bad <= sizes[table] else sizes[table] + bad)
                     for table, (bad, _) in shares.shares.items()}
    shares.lower_bound = True
    return shares


def _ids_read(removed: Removed) -> str:
    return ("incremental: the OP id columns were read (the row counts did not match the "
            "last scan's, or it kept none to compare with); rows deleted since name "
            f"{len(removed.patients)} patient(s) and {len(removed.contacts)} contact(s)")


def _nothing_changed(
    deps: Deps, now: datetime, since: datetime, rows: int, elapsed: float,
    task_id: str | None, also: duplicate_index.Persist,
) -> RunResult:
    """Record the cheap run (so status and the dead-man's switch see it) and move on."""
    scope = Scope("entities", "nothing changed", exclude_checks=FULL_SCAN_ONLY)
    with deps.sessions() as session, session.begin():
        run = Run(
            practice=deps.settings.practice, kind="incremental", scope=scope.label,
            status="succeeded", started_at=now, finished_at=now + timedelta(seconds=elapsed),
            task_id=task_id, records_read=rows,
            summary={"since": since.isoformat(), "by_check": {}, "by_decision": {}},
        )
        session.add(run)
        session.flush()
        run_id = run.id
    result = RunResult(
        run_id=run_id, kind="incremental", scope=scope, plan=Plan(), counts={},
        sync=SyncResult(), dry_run=False, read_seconds=elapsed, check_seconds=0.0,
        total_seconds=elapsed, suppressed_recent=0,
        trace=[f"incremental: nothing changed since {since.isoformat()} ({rows} row(s) read)"],
    )
    record_scan(deps, now, result, None, also)
    return result
