"""`contact_duplicate` in incremental scans and family runs, without reading every contact.

A full scan keeps what its duplicate matcher learned (worker.matching.index): the
Fellegi-Sunter parameters and the blocking keys of every contact (`duplicate_index`, one
row per practice, ~90 bytes a contact). An incremental scan in which contacts changed:

1. reads the contacts to decide (the changed and deleted ones and the members of their
   open groups) by id, and brings the kept keys up to date with them;
2. looks up, in the kept keys, each one's candidates through the same blocking passes
   and caps as the full scan, reads those by id, scores the pairs with the kept
   parameters and groups them (`matching.index.groups_around`: when a group reaches a
   contact whose candidates were not read, they are read too, a few rounds at most);
3. keeps the keys it changed (`duplicate_key_changes`) in the transaction that moves the
   watermark, and marks the index as covering it (`covered_at`).

The kept index is used only while it covers the last watermark: a sharded full scan or
a failed write leaves it behind, and so does a missing or older-version model. Then, and
for a bulk change (more than `BULK_SHARE` of the contacts to decide), the scan falls back
to reading every contact and running the whole matcher, as before, says so in its log
and trace, and keeps what that run learned. A scan with no contact changes only moves
`covered_at` along.

Runs about a few families (on-call `--patient` / `--contact`: `decide_family`) decide the
groups of their contacts through the same steps 1-2 and keep nothing; without a usable
kept index they fall back to their exact-key candidates
(worker.scan.incremental.duplicate_candidates), never to a read of every contact.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import structlog
from sqlalchemy.orm import Session

from worker.checks.duplicates import duplicate_findings, group_findings
from worker.matching.index import (
    MAX_ROUNDS,
    KeyIndex,
    Learned,
    contact_keys,
    groups_around,
    model_from_dict,
    model_to_dict,
)
from worker.model.findings import Finding
from worker.model.records import Contact
from worker.state import duplicates as kept

log = structlog.get_logger(__name__)

Persist = Callable[[Session], None]

# More contacts to decide than this share of the practice (and at least MIN_BULK): read
# every contact and run the whole matcher instead of reading each one's candidates by id.
BULK_SHARE = 0.05
MIN_BULK = 1000

_cache_lock = threading.Lock()
_cache: dict[str, tuple[str, KeyIndex]] = {}  # practice -> (token, the build's keys)


@dataclass
class Decision:
    """The groups an incremental scan decided, and what to keep once it succeeds."""

    findings: list[Finding]
    decided: frozenset[str]  # contacts whose groups this run decides
    trace: str
    persist: Persist  # inside the transaction that moves the watermark
    contacts_read: int = 0
    whole: bool = False  # every contact was read (no usable kept index)


def save_learned(learned: Learned, practice: str, built_at: datetime) -> Persist:
    """Keep a whole run's parameters and keys (covering the watermark `built_at`)."""
    token = uuid.uuid4().hex
    keys = learned.index.to_bytes()
    model = model_to_dict(learned.model)
    contacts = learned.index.n

    def persist(session: Session) -> None:
        kept.save_index(session, practice, token=token, built_at=built_at,
                        covered_at=built_at, contacts=contacts, model=model, keys=keys,
                        now=built_at)
        with _cache_lock:
            _cache[practice] = (token, learned.index)

    return persist


def keep_current(deps: Any, mark_at: datetime, now: datetime) -> Persist:
    """For a scan that changed no contact: the kept index, if it covered the last
    watermark, covers this scan's too."""
    with deps.sessions() as session:
        head = kept.index_head(session, deps.settings.practice)

    def persist(session: Session) -> None:
        if head is not None and head.covered_at == mark_at:
            kept.advance_index(session, deps.settings.practice, now, now)

    return persist


def _read(reads: Any, ids: Collection[str]) -> Iterable[Contact]:
    return (c for c in reads.contacts(ids=ids) if isinstance(c, Contact))


def _kept_index(deps: Any, mark_at: datetime) -> tuple[Any, KeyIndex | None, str]:
    """(model, base index with the kept changes applied, "") or (None, None, reason)."""
    practice = deps.settings.practice
    with deps.sessions() as session:
        head = kept.index_head(session, practice)
        if head is None:
            return None, None, "no model learned by a full scan is kept yet"
        if head.covered_at != mark_at:
            return None, None, ("the kept blocking keys miss changes since "
                                f"{head.covered_at.isoformat()} (the last full scan kept none)")
        model = model_from_dict(head.model)
        if model is None:
            return None, None, "the kept model is of another version"
        with _cache_lock:
            cached = _cache.get(practice)
        base = cached[1] if cached is not None and cached[0] == head.token else None
        if base is None:
            blob = kept.index_keys(session, practice, head.token)
            try:
                base = KeyIndex.from_bytes(blob or b"")
            except ValueError as err:
                return None, None, f"the kept blocking keys cannot be used ({err})"
            with _cache_lock:
                _cache[practice] = (head.token, base)
        changes = kept.key_changes(session, practice)
    updates = {cid: (np.array(k, dtype=np.int64) if k is not None else None)
               for cid, k in changes.items()}
    return model, base.updated(updates), ""


@dataclass
class _Looked:
    """The groups around some contacts, decided through the kept index."""

    findings: list[Finding]
    changed: dict[str, np.ndarray | None]  # keys that differ from the kept ones
    contacts: int  # contacts of the practice (kept keys)
    read: int  # contact rows read
    pairs: int
    rounds: int


def _through_index(deps: Any, reads: Any, focus: set[str], mark_at: datetime | None,
                   known: Iterable[Contact] = ()) -> _Looked | str:
    """Steps 1-2 of the module docstring (`known`: current records of focus contacts
    already read, not read again), or why the kept index cannot be used."""
    if mark_at is None:
        return "no scan has set a watermark yet"
    model, index, reason = _kept_index(deps, mark_at)
    if model is None or index is None:
        return reason
    if len(focus) > max(MIN_BULK, index.n * BULK_SHARE):
        return (f"{len(focus)} contacts changed (a bulk change: one read of every "
                "contact costs less than reads by id)")
    rows_before = reads.rows
    current: dict[str, Contact] = {}
    for c in known:
        if c.contact_id in focus:
            current.setdefault(c.contact_id, c)
    for c in _read(reads, focus - set(current)):
        current.setdefault(c.contact_id, c)
    ids, keys = contact_keys(current.values())
    updates: dict[str, np.ndarray | None] = dict(zip(ids, keys, strict=True))
    updates.update({cid: None for cid in focus if cid not in current})
    changed = {cid: k for cid, k in updates.items() if not _same(index.keys_of(cid), k)}
    index = index.updated(changed)
    around = groups_around(focus, index, model, lambda wanted: _read(reads, wanted),
                           known=current.values(),
                           threshold=deps.settings.duplicate_match_threshold)
    if around.groups is None:
        return f"a duplicate group kept growing after {MAX_ROUNDS} rounds of reads"
    return _Looked(list(group_findings(around.groups)), changed, index.n,
                   reads.rows - rows_before, around.pairs, around.rounds)


def decide(deps: Any, reads: Any, focus: set[str], mark_at: datetime,
           now: datetime) -> Decision:
    """The duplicate groups holding a `focus` contact (module docstring)."""
    t0 = time.perf_counter()
    looked = _through_index(deps, reads, focus, mark_at)
    if isinstance(looked, str):
        return _whole(deps, reads, focus, now, looked)
    practice = deps.settings.practice
    findings, read = looked.findings, looked.read
    kept_changes = {cid: (k.tolist() if k is not None else None)
                    for cid, k in looked.changed.items()}

    def persist(session: Session) -> None:
        kept.save_key_changes(session, practice, kept_changes, now, now)

    seconds = time.perf_counter() - t0
    log.info("duplicates_incremental", focus=len(focus), contacts_read=read,
             rounds=looked.rounds, pairs=looked.pairs, groups=len(findings),
             keys_changed=len(looked.changed), seconds=round(seconds, 3))
    return Decision(
        findings, frozenset(focus).union(*(f.contact_ids or () for f in findings)),
        _trace(focus, looked, seconds), persist, read)


def decide_family(deps: Any, reads: Any, focus: set[str], mark_at: datetime | None,
                  known: Iterable[Contact] = ()) -> Decision | str:
    """For a run about a few families (worker.scan.incremental.family_reconcile): the
    groups holding a `focus` contact, decided as `decide` does (the same kept keys and
    parameters, the same reads by id), or why the kept index cannot be used. Nothing is
    kept: a family run does not move the watermark, so the next incremental scan still
    brings the keys of changed contacts up to date. Keys of contacts changed since the
    last scan (other than the focus ones, read now) are that scan's: a contact changed
    since to look like a focus contact is found by the next incremental scan."""
    t0 = time.perf_counter()
    looked = _through_index(deps, reads, focus, mark_at, known)
    if isinstance(looked, str):
        return looked
    seconds = time.perf_counter() - t0
    log.info("duplicates_family", focus=len(focus), contacts_read=looked.read,
             rounds=looked.rounds, pairs=looked.pairs, groups=len(looked.findings),
             seconds=round(seconds, 3))
    return Decision(
        looked.findings,
        frozenset(focus).union(*(f.contact_ids or () for f in looked.findings)),
        _trace(focus, looked, seconds), _noop, looked.read)


def _trace(focus: Collection[str], looked: _Looked, seconds: float) -> str:
    return (f"contact_duplicate: {len(focus)} contact(s) compared through the kept blocking "
            f"keys of {looked.contacts} with the last full scan's parameters; {looked.read} "
            f"contact row(s) read, {looked.pairs} pair(s) scored, {len(looked.findings)} "
            f"group(s), {seconds:.2f}s")


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def _whole(deps: Any, reads: Any, focus: set[str], now: datetime, reason: str) -> Decision:
    """The fallback: every contact read and the whole matcher run, as a full scan does;
    what it learned is kept for the next scans."""
    t0 = time.perf_counter()
    log.info("duplicates_whole_rerun", reason=reason, focus=len(focus))
    rows_before = reads.rows
    pool: dict[str, Contact] = {}
    for c in reads.counted(deps.op.contacts()):
        if isinstance(c, Contact):
            pool.setdefault(c.contact_id, c)  # the first row of an id, as a snapshot keeps
    learned: list[Learned] = []
    findings = list(duplicate_findings(pool.values(), deps.settings.duplicate_match_threshold,
                                       focus, learned=learned))
    read = reads.rows - rows_before
    persist: Persist = (save_learned(learned[0], deps.settings.practice, now) if learned
                        else _noop)
    return Decision(
        findings, frozenset(focus).union(*(f.contact_ids or () for f in findings)),
        f"contact_duplicate: {reason}, so all {len(pool)} contacts were read and the "
        f"whole matcher ran ({time.perf_counter() - t0:.2f}s); what it learned is kept "
        "for the next scans", persist, read, whole=True)


def _noop(session: Session) -> None:
    return None
