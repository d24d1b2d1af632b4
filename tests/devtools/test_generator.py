"""The synthetic practice: deterministic, in the contract's layout, and its manifest exact.

The manifest is what the checks are scored against, so it is checked here against an
independent, deliberately plain reading of docs/checks.md (`_oracle`), not against the
checks themselves: a generator bug and a check bug must not be able to hide each other.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from email_validator import EmailNotValidError, validate_email

from worker.checks.catalog import BY_ID, CHECK_IDS
from worker.devtools.generator import (
    NICKNAMES_F,
    NICKNAMES_M,
    DefectRates,
    PracticeRecords,
    RawRow,
    _norm,
    generate_practice,
    generate_records,
    main,
)
from worker.matching.normalise import normalise_email, normalise_phone
from worker.model.findings import Action, Finding, Severity
from worker.model.records import WELCOME_ACTION, Contact, FamilyContact, InvalidRecord
from worker.sources.csv_source import CsvOPSource, CsvPortalSource
from worker.sources.layout import OP_LAYOUT, PORTAL_LAYOUT

NOW = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
FILES = [("op", t) for t in OP_LAYOUT] + [("portal", t) for t in PORTAL_LAYOUT]


@pytest.fixture(scope="module")
def practice() -> PracticeRecords:
    return generate_records(2000, seed=7, now=NOW)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen300")
    generate_practice(out, 300, seed=3, now=NOW)
    return out


def _manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "manifest.jsonl").read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# -- files ------------------------------------------------------------------------------


def test_same_seed_and_now_give_identical_bytes(tmp_path: Path) -> None:
    generate_practice(tmp_path / "a", 400, seed=5, now=NOW)
    generate_practice(tmp_path / "b", 400, seed=5, now=NOW)
    generate_practice(tmp_path / "c", 400, seed=6, now=NOW)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert set(a) == {f"{d}/{t}.csv" for d, t in FILES} | {"manifest.jsonl", "generator.json"}
    assert a == b
    assert a["op/patients.csv"] != c["op/patients.csv"]
    assert a["manifest.jsonl"] != c["manifest.jsonl"]


def test_files_have_the_contract_headers(small: Path) -> None:
    for folder, table in FILES:
        with open(small / folder / f"{table}.csv", newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh))
        layout = OP_LAYOUT if folder == "op" else PORTAL_LAYOUT
        assert tuple(header) == layout[table]


def test_generator_json_describes_the_run(small: Path) -> None:
    meta = json.loads((small / "generator.json").read_text())
    assert meta["seed"] == 3 and meta["now"] == NOW.isoformat() and meta["patients"] == 300
    assert meta["rates"] == {k: 0.01 for k in meta["rates"]}
    manifest = _manifest(small)
    assert meta["findings"] == dict(Counter(m["check"] for m in manifest))
    assert sum(meta["suppressed_recent"].values()) >= 1
    for folder, table in FILES:
        lines = (small / folder / f"{table}.csv").read_text(encoding="utf-8").count("\n")
        assert meta["counts"][table] == lines - 1


def test_every_check_is_exercised_and_fingerprints_are_unique(small: Path) -> None:
    manifest = _manifest(small)
    assert {m["check"] for m in manifest} == set(CHECK_IDS)
    prints = [m["fingerprint"] for m in manifest]
    assert len(prints) == len(set(prints))
    for m in manifest:
        keys = ["check", "severity", "action", "fingerprint", "patient_id", "contact_id",
                "portal_user_id", "detail"]
        assert list(m) == keys + (["contact_ids"] if m["check"] == "contact_duplicate" else [])
        spec = BY_ID[m["check"]]
        if m["check"] not in ("contact_email_invalid", "welcome_not_sent"):
            assert (m["severity"], m["action"]) == (spec.severity, spec.action)


def test_exact_patient_count_and_ids(small: Path) -> None:
    records = list(CsvOPSource(small / "op").patients())
    good = [r for r in records if not isinstance(r, InvalidRecord)]
    assert len(good) == 300
    assert all(len(r.patient_id) == 7 and r.patient_id[0] == "P" for r in good)


def test_the_csv_reader_sees_exactly_the_planted_bad_rows(small: Path) -> None:
    op, portal = CsvOPSource(small / "op"), CsvPortalSource(small / "portal")
    streams = [op.patients(), op.contacts(), op.family_contacts(), portal.users(),
               portal.links(), portal.sources(), portal.audit()]
    bad = [r for s in streams for r in s if isinstance(r, InvalidRecord)]
    seen = {Finding("invalid_record", Severity.WARNING, Action.ALERT, "", r.patient_id,
                    r.contact_id, r.portal_user_id, key_extra=f"{r.source}:{r.line}").fingerprint
            for r in bad}
    planted = {m["fingerprint"] for m in _manifest(small) if m["check"] == "invalid_record"}
    assert seen == planted and len(bad) == len(planted)


def test_cli_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--patients", "50", "--out", str(tmp_path), "--seed", "1",
                 "--now", "2026-11-02T14:00:00+00:00"]) == 0
    assert json.loads(capsys.readouterr().out)["patients"] == 50
    meta = json.loads((tmp_path / "generator.json").read_text())
    assert meta["now"] == NOW.isoformat()


def test_small_practices_and_rates() -> None:
    assert sum(1 for _ in generate_records(1, now=NOW).records("patients")) == 1
    tiny = generate_records(10, seed=1, now=NOW)
    assert len(tiny.records("patients")) == 10 and not tiny.findings
    none = DefectRates(**dict.fromkeys(DefectRates.__dataclass_fields__, 0.0))
    clean = generate_records(1000, seed=2, now=NOW, rates=none)
    floor = {f.check for f in clean.findings}  # at least one of each at >= 100 patients
    assert floor == set(CHECK_IDS)


# -- records ----------------------------------------------------------------------------


def test_rows_reference_existing_ids(practice: PracticeRecords) -> None:
    patients = {p.patient_id for p in practice.records("patients")}
    contacts = {c.contact_id for c in practice.records("contacts")}
    users = {u.user_id: u for u in practice.records("portal_users")}
    orphans = {f.portal_user_id for f in practice.findings if f.check == "portal_orphan_user"}
    for fc in practice.records("family_contacts"):
        assert fc.patient_id in patients and fc.contact_id in contacts
    for c in practice.records("contacts"):
        assert c.patient_id is None or c.patient_id in patients
    for uid, u in users.items():
        dangling = (u.op_patient_id and u.op_patient_id not in patients) or (
            u.op_contact_id and u.op_contact_id not in contacts) or not (
            u.op_patient_id or u.op_contact_id)
        assert bool(dangling) == (uid in orphans), uid
    for link in practice.records("portal_links"):
        assert link.caregiver_user_id in users and link.dependent_user_id in users
        assert link.caregiver_user_id not in orphans
    assert {s.user_id for s in practice.records("portal_sources")} == set(users)
    for table in ("patients", "contacts", "portal_users"):
        key = OP_LAYOUT.get(table, PORTAL_LAYOUT.get(table))[0]
        ids = [getattr(r, key) for r in practice.records(table)]
        assert len(ids) == len(set(ids)), table


def test_only_planted_records_changed_recently(practice: PracticeRecords) -> None:
    day_ago, cutoff = NOW - timedelta(days=1), NOW - timedelta(minutes=15)
    recent = [r for t in OP_LAYOUT for r in practice.records(t) if r.updated_at > day_ago]
    assert recent and all(r.updated_at > cutoff for r in recent)
    assert all(r.updated_at < NOW for t in OP_LAYOUT for r in practice.records(t))


def test_manifest_is_exactly_what_the_rules_say(practice: PracticeRecords) -> None:
    expected = {f.fingerprint: f for f in practice.findings if f.check != "contact_duplicate"}
    oracle = _oracle(practice, NOW)
    assert set(oracle) == set(expected), _diff(oracle, expected)
    for fp, f in expected.items():
        assert (oracle[fp].severity, oracle[fp].action) == (f.severity, f.action), f


def test_recent_changes_are_the_only_suppressed_candidates(practice: PracticeRecords) -> None:
    everything = _oracle(practice, NOW, honour_recent=False)
    honoured = _oracle(practice, NOW)
    hidden = Counter(f.check for fp, f in everything.items() if fp not in honoured)
    assert set(honoured) <= set(everything)
    assert hidden == Counter(practice.stats["suppressed_recent"])
    assert set(hidden) == {"caregiver_link_missing", "caregiver_link_stale", "patient_inactive",
                           "portal_patient_email_not_dummy", "welcome_not_sent"}


def test_clean_families_have_their_portal_accounts(practice: PracticeRecords) -> None:
    """Every authorized contact with a valid email either has a caregiver account linked
    to each dependent's patient account, or was invited within the week, unless the
    manifest (or a planted recent change) says otherwise."""
    s = _Index(practice)
    flagged = {f.contact_id for f in practice.findings} | {f.patient_id for f in
                                                            practice.findings}
    recent_cut = NOW - timedelta(minutes=15)
    accounts = invited = 0
    for cid, fcs in s.fc_by_contact.items():
        c = s.contacts[cid]
        auth = [fc for fc in fcs if s.authorized(fc) and s.active(s.patients[fc.patient_id])]
        if not auth or cid in flagged or not _valid(c.email):
            continue
        if c.updated_at > recent_cut or any(fc.updated_at > recent_cut for fc in auth):
            continue
        users = s.users_by_contact.get(cid, [])
        if not users:
            assert s.welcome.get(c.email.lower(), NOW - timedelta(days=30)) >= NOW - timedelta(
                days=7), cid
            invited += 1
            continue
        (user,) = users
        assert user.role == "Caregiver" and user.email == c.email
        accounts += 1
        for fc in auth:
            if fc.patient_id in flagged or s.patients[fc.patient_id].updated_at > recent_cut:
                continue
            for d in s.users_by_patient.get(fc.patient_id, []):
                assert d.role == "Patient" and d.email.lower().endswith("@dummy.com")
                assert (user.user_id, d.user_id) in s.links
    assert accounts > 500 and invited > 0


def test_only_planted_duplicates_share_identifiers(practice: PracticeRecords) -> None:
    """Emails and phones are unique outside planted groups, and contacts sharing a DOB
    share no name token: nothing else can look like one person."""
    group_of: dict[str, int] = {}
    for i, f in enumerate(f for f in practice.findings if f.check == "contact_duplicate"):
        for cid in f.contact_ids:
            group_of[cid] = i
    # Household traps share a landline (and a father and son a name) by design: each
    # pair is one "group" here, and the matcher must keep it apart (test_scoring).
    assert {kind for kind, _, _ in practice.traps} == {"similar_spouses", "father_and_son"}
    for j, (_, a, b) in enumerate(practice.traps, start=len(group_of) + 1):
        group_of[a] = group_of[b] = -j
    contacts = practice.records("contacts")
    by: dict[tuple[str, Any], list[Contact]] = defaultdict(list)
    for c in contacts:
        if c.email:
            by[("email", c.email.lower())].append(c)
        by[("phone", c.phone)].append(c)
        if c.dob:
            for token in {_norm(c.first_name), _norm(c.last_name)}:
                by[("dob", (c.dob, token))].append(c)
    for key, same in by.items():
        for a, b in combinations(same, 2):
            assert a.contact_id in group_of and group_of[a.contact_id] == group_of.get(
                b.contact_id), (key[0], a.contact_id, b.contact_id)


def test_planted_duplicate_groups_are_one_person(practice: PracticeRecords) -> None:
    contacts = {c.contact_id: c for c in practice.records("contacts")}
    groups = [f for f in practice.findings if f.check == "contact_duplicate"]
    assert any(len(g.contact_ids) == 3 for g in groups)
    assert any(len(g.contact_ids) == 2 for g in groups)
    for g in groups:
        assert g.contact_id == min(g.contact_ids) and list(g.contact_ids) == sorted(g.contact_ids)
        members = [contacts[c] for c in g.contact_ids]
        for a, b in combinations(members, 2):
            assert _names_agree(a, b), (a.first_name, a.last_name, b.first_name, b.last_name)
            email = normalise_email(a.email)
            phone = normalise_phone(a.phone)
            assert (email and email == normalise_email(b.email)) or (
                phone and phone == normalise_phone(b.phone)) or (a.dob and b.dob)
            if a.dob and b.dob and a.dob != b.dob:  # a typo: one digit, or day/month
                da, db = a.dob.strftime("%Y%m%d"), b.dob.strftime("%Y%m%d")
                swapped = (a.dob.year, a.dob.month, a.dob.day) == (b.dob.year, b.dob.day,
                                                                  b.dob.month)
                assert swapped or sum(x != y for x, y in zip(da, db, strict=True)) == 1


def test_planted_noise_and_traps_are_there(practice: PracticeRecords) -> None:
    """The generator no longer plants only what the matcher looks for (issue 15)."""
    contacts = {c.contact_id: c for c in practice.records("contacts")}
    pairs = [(contacts[a], contacts[b]) for f in practice.findings
             if f.check == "contact_duplicate" for a, b in combinations(f.contact_ids, 2)]
    assert any(a.dob and b.dob and a.dob != b.dob for a, b in pairs)  # DOB typos
    assert any("-" in a.last_name + b.last_name and a.last_name != b.last_name
               for a, b in pairs)  # married names
    kinds = {kind for kind, _, _ in practice.traps}
    assert kinds == {"similar_spouses", "father_and_son"}
    for _, a, b in practice.traps:
        assert normalise_phone(contacts[a].phone) == normalise_phone(contacts[b].phone)


def test_generated_emails_are_valid_unless_planted(practice: PracticeRecords) -> None:
    bad = {f.contact_id for f in practice.findings if f.check == "contact_email_invalid"}
    for c in practice.records("contacts"):
        if c.contact_id not in bad and c.email:
            assert _valid(c.email), c.email


# -- the oracle: docs/checks.md, read plainly ------------------------------------------


def _valid(email: str) -> bool:
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def _names_agree(a: Contact, b: Contact) -> bool:
    fa, la, fb, lb = (_norm(x) for x in (a.first_name, a.last_name, b.first_name, b.last_name))
    if (fa, la) == (fb, lb) or (fa, la) == (lb, fb):
        return True
    if fa == fb and (la.startswith(lb) or lb.startswith(la)):
        return True  # a married name: "Smith" and "Smith-Doe"
    if la != lb:
        return False
    nick = {(_norm(k), _norm(v)) for k, v in {**NICKNAMES_F, **NICKNAMES_M}.items()}
    if (fa, fb) in nick or (fb, fa) in nick:
        return True
    return len(fa) == len(fb) and sum(x != y for x, y in zip(fa, fb, strict=True)) == 1


class _Index:
    def __init__(self, pr: PracticeRecords) -> None:
        self.patients = {p.patient_id: p for p in pr.records("patients")}
        self.contacts = {c.contact_id: c for c in pr.records("contacts")}
        self.fcs: list[FamilyContact] = pr.records("family_contacts")
        self.fc_by_patient: dict[str, list[FamilyContact]] = defaultdict(list)
        self.fc_by_contact: dict[str, list[FamilyContact]] = defaultdict(list)
        for fc in self.fcs:
            self.fc_by_patient[fc.patient_id].append(fc)
            self.fc_by_contact[fc.contact_id].append(fc)
        self.users = {u.user_id: u for u in pr.records("portal_users")}
        self.users_by_contact: dict[str, list[Any]] = defaultdict(list)
        self.users_by_patient: dict[str, list[Any]] = defaultdict(list)
        for u in self.users.values():
            if u.active and u.op_contact_id:
                self.users_by_contact[u.op_contact_id].append(u)
            if u.active and u.op_patient_id:
                self.users_by_patient[u.op_patient_id].append(u)
        self.links = {(x.caregiver_user_id, x.dependent_user_id)
                      for x in pr.records("portal_links")}
        self.welcome: dict[str, datetime] = {}
        for e in pr.records("portal_audit"):
            if e.action == WELCOME_ACTION:
                key = e.email.strip().lower()
                self.welcome[key] = max(e.at, self.welcome.get(key, e.at))

    @staticmethod
    def active(p: Any) -> bool:
        return p.status.strip().lower() == "active"

    def authorized(self, fc: FamilyContact) -> bool:
        c = self.contacts.get(fc.contact_id)
        return fc.authority.grants_access and not fc.is_self and c is not None and c.active


def _oracle(pr: PracticeRecords, now: datetime, honour_recent: bool = True) -> dict[str, Finding]:
    s = _Index(pr)
    out: dict[str, Finding] = {}
    cutoff = now - timedelta(minutes=15)

    def recent(*records: Any) -> bool:
        return honour_recent and any(r.updated_at > cutoff for r in records)

    def add(check: str, severity: Severity | None = None, action: Action | None = None,
            **ids: Any) -> None:
        spec = BY_ID[check]
        f = Finding(check, severity or spec.severity, action or spec.action, "", **ids)
        assert f.fingerprint not in out, f
        out[f.fingerprint] = f

    def on_active(fcs: Iterable[FamilyContact]) -> list[FamilyContact]:
        return [fc for fc in fcs if s.authorized(fc) and fc.patient_id in s.patients
                and s.active(s.patients[fc.patient_id])]

    for fc in s.fcs:
        p, c = s.patients.get(fc.patient_id), s.contacts.get(fc.contact_id)
        if p is None or c is None or not s.active(p):
            continue
        if fc.is_parent_role and not fc.authority.grants_access and c.active and c.email.strip():
            add("authority_invalid", patient_id=p.patient_id, contact_id=c.contact_id)
        if fc.authority.grants_access and not c.active:
            add("contact_inactive", patient_id=p.patient_id, contact_id=c.contact_id)

    self_role: set[str] = set()
    for c in s.contacts.values():
        own = c.patient_id
        if not own or own not in s.patients:
            continue
        mine = s.fc_by_contact[c.contact_id]
        if not any(s.authorized(fc) and fc.patient_id != own for fc in mine):
            continue
        entries = [fc for fc in s.fc_by_patient[own] if fc.contact_id == c.contact_id]
        if any(fc.is_self for fc in entries):
            self_role.add(c.contact_id)
            add("self_role", patient_id=own, contact_id=c.contact_id)
        elif not any(fc.authority.grants_access for fc in entries):
            add("self_dependent_missing", patient_id=own, contact_id=c.contact_id)

    for c in s.contacts.values():
        auth = on_active(s.fc_by_contact[c.contact_id])
        if not auth:
            continue
        email = c.email.strip()
        if not email:
            add("contact_email_invalid", Severity.INFO, contact_id=c.contact_id)
        elif not _valid(email):
            add("contact_email_invalid", Severity.WARNING, contact_id=c.contact_id)
        elif c.active and not s.users_by_contact.get(c.contact_id):
            sent = s.welcome.get(email.lower())
            if sent is not None and sent >= now - timedelta(days=7):
                continue
            if recent(c, *auth, *(s.patients[fc.patient_id] for fc in auth)):
                continue
            action = Action.ALERT if c.contact_id in self_role else None
            add("welcome_not_sent", action=action, contact_id=c.contact_id)

    for p in s.patients.values():
        real = p.email.strip() and p.email.strip().upper() not in ("N/A", "NA")
        if s.active(p) and real and any(s.authorized(fc) for fc in s.fc_by_patient[p.patient_id]):
            add("patient_email_present", patient_id=p.patient_id)

    for u in s.users.values():
        if not u.active:
            continue
        if (u.op_contact_id and u.op_contact_id not in s.contacts) or (
                u.op_patient_id and u.op_patient_id not in s.patients) or not (
                u.op_contact_id or u.op_patient_id):
            add("portal_orphan_user", portal_user_id=u.user_id)
            continue
        if not u.op_patient_id:
            continue
        p = s.patients[u.op_patient_id]
        if recent(p):
            continue
        ids = {"patient_id": p.patient_id, "portal_user_id": u.user_id}
        if not s.active(p):
            add("patient_inactive", **ids)
        elif u.role != "Patient":
            add("portal_patient_role_invalid", **ids)
        elif not u.email.strip().lower().endswith("@dummy.com"):
            add("portal_patient_email_not_dummy", **ids)

    for fc in on_active(s.fcs):
        p, c = s.patients[fc.patient_id], s.contacts[fc.contact_id]
        for cu in s.users_by_contact.get(c.contact_id, []):
            for du in s.users_by_patient.get(p.patient_id, []):
                if (cu.user_id, du.user_id) not in s.links and not recent(p, c, fc):
                    add("caregiver_link_missing", patient_id=p.patient_id,
                        contact_id=c.contact_id, portal_user_id=cu.user_id)

    for cu_id, du_id in s.links:
        cu, du = s.users[cu_id], s.users[du_id]
        if not (cu.active and du.active and cu.op_contact_id and du.op_patient_id):
            continue
        c, p = s.contacts.get(cu.op_contact_id), s.patients.get(du.op_patient_id)
        if c is None or p is None or not s.active(p):
            continue
        fcs = [fc for fc in s.fc_by_patient[p.patient_id] if fc.contact_id == c.contact_id]
        if not any(s.authorized(fc) for fc in fcs) and not recent(p, c, *fcs):
            add("caregiver_link_stale", patient_id=p.patient_id, contact_id=c.contact_id,
                portal_user_id=cu_id)

    ids_of = {"patients": ("patient_id", None), "contacts": ("patient_id", "contact_id"),
              "family_contacts": ("patient_id", "contact_id")}
    for table, (pcol, ccol) in ids_of.items():
        for i, row in enumerate(pr.rows[table]):
            if isinstance(row, RawRow) and row.record is None:
                add("invalid_record", patient_id=row.get(pcol) or None,
                    contact_id=(row.get(ccol) or None) if ccol else None,
                    key_extra=f"{table}.csv:{i + 2}")
    return out


def _diff(got: dict[str, Finding], want: dict[str, Finding]) -> str:
    extra = [f.to_json() for fp, f in got.items() if fp not in want][:5]
    missing = [f.to_json() for fp, f in want.items() if fp not in got][:5]
    return f"oracle-only {extra}\nmanifest-only {missing}"
