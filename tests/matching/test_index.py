"""Deciding a few contacts' duplicate groups from kept blocking keys (worker.matching.index)
gives what a whole run gives: the same candidates, the same groups, with the whole run's
parameters. Population: a generated practice, FEBRL's sample, a front desk's email on 60
records (a placeholder) and 13 namesakes born one year (a block too big to compare)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
from test_febrl_sample import _contacts as febrl_contacts

from worker.devtools.generator import generate_practice
from worker.matching import blocking, fellegi_sunter
from worker.matching.columns import Columns
from worker.matching.duplicates import DuplicateStats, find_duplicate_groups
from worker.matching.index import (
    KEYS,
    KeyIndex,
    groups_around,
    model_from_dict,
    model_to_dict,
)
from worker.model.records import Contact
from worker.sources.csv_source import read_contacts_file


def person(cid: str, first: str, last: str, *, email: str = "", dob: date | None = None,
           phone: str = "", address: str = "", postcode: str = "") -> Contact:
    return Contact(cid, first, last, email, dob, phone, address, "Portland", postcode, True)


def chain() -> list[Contact]:
    """A-B share an email, B-C a phone, A and C nothing a blocking pass looks at."""
    return [
        person("X1", "Jonathan", "Quillfeather", email="jq@example.org",
               dob=date(1981, 4, 2), address="1 Elm St", postcode="11111"),
        person("X2", "Jonathan", "Quillfeather", email="jq@example.org",
               dob=date(1981, 4, 2), phone="207-555-0142"),
        person("X3", "Jon", "Quillfeather", phone="(207) 555 0142", address="9 Oak Ave",
               postcode="22222"),
    ]


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> list[Contact]:
    out = tmp_path_factory.mktemp("practice")
    generate_practice(out, 700, seed=3, now=datetime(2026, 3, 1, tzinfo=UTC))
    found = [c for c in read_contacts_file(Path(out) / "op" / "contacts.csv")
             if isinstance(c, Contact)]
    found += febrl_contacts()
    # One more than a block may hold: made missing, not compared (D0/D1 share a name).
    found += [person(f"D{k}", "Grace" if k < 2 else f"Parent{k}", "Frontdesk",
                     email="frontdesk@clinic.example") for k in range(51)]
    found += [person(f"S{k}", "John", "Smith", dob=date(1980, 1 + k % 12, 1 + k))
              for k in range(13)]
    return found + chain()


def whole_run(contacts: list[Contact]) -> tuple[list, DuplicateStats]:
    stats = DuplicateStats()
    return find_duplicate_groups(contacts, stats=stats), stats


def test_candidates_are_the_blocking_passes_over_the_whole_practice(
    population: list[Contact],
) -> None:
    index = KeyIndex.build(population)
    cols = Columns(population)
    for name in ("email", "phone", "addr"):
        cols.blank_common(name, 50)
    rng = random.Random(5)
    for focus in (set(rng.sample(cols.ids, 200)), {"D1", "S3", "X1"}, set(cols.ids)):
        mask = np.array([c in focus for c in cols.ids])
        cand = blocking.candidates(cols, 50, mask)
        want = {(cols.ids[a], cols.ids[b]) for a, b in zip(cand.i.tolist(), cand.j.tolist(),
                                                            strict=True)}
        got = {tuple(sorted((a, b))) for a, others in index.candidates(focus).items()
               for b in others}
        assert got == want
    # The front desk's email and the 13 namesakes make no pairs; the chain's ends none.
    assert index.candidates({"D2", "S1", "X1"}) == {"D2": set(), "S1": set(), "X1": {"X2"}}


def test_groups_around_a_few_contacts_are_the_whole_runs(population: list[Contact]) -> None:
    groups, stats = whole_run(population)
    assert stats.model is not None and len(groups) >= 5
    index = KeyIndex.build(population)
    by_id = {c.contact_id: c for c in population}
    reads: list[int] = []

    def read(ids: set[str]) -> list[Contact]:
        reads.append(len(ids))
        return [by_id[c] for c in ids if c in by_id]

    rng = random.Random(11)
    members = [c for g in groups for c in g.contact_ids]
    for focus in [{"X1"}, {"D0"}, {"S1"}, *({*rng.sample(list(by_id), 4), rng.choice(members)}
                            for _ in range(12))]:
        want = [g for g in groups if not focus.isdisjoint(g.contact_ids)]
        around = groups_around(focus, index, stats.model, read)
        assert around.groups == want, focus
        assert around.read < 120
    # The chain is one group, found from one end in three rounds of reads.
    chained = groups_around({"X1"}, index, stats.model, read)
    assert chained.groups is not None and chained.rounds == 3
    assert [g.contact_ids for g in chained.groups] == [("X1", "X2", "X3")]
    # Bounded: a chain longer than the rounds allowed is left to a whole run.
    assert groups_around({"X1"}, index, stats.model, read, rounds=2).groups is None


def test_an_index_brought_up_to_date_is_a_fresh_one(population: list[Contact]) -> None:
    index = KeyIndex.build(population)
    rng = random.Random(2)
    gone = {c.contact_id for c in rng.sample(population, 5)}
    edited = [Contact(c.contact_id, c.last_name, c.first_name, "new@example.net", c.dob,
                      c.phone, "", c.city, "", c.active)
              for c in rng.sample([c for c in population if c.contact_id not in gone], 5)]
    added = [person("N1", "Ada", "Lovelace", email="ada@example.org")]
    now = {c.contact_id: c for c in population if c.contact_id not in gone}
    now.update({c.contact_id: c for c in [*edited, *added]})
    fresh = KeyIndex.build(now.values())
    changed = KeyIndex.build([*edited, *added])
    updates: dict[str, np.ndarray | None] = {cid: None for cid in gone}
    updates.update({cid: changed.keys_of(cid) for cid in changed.ids})
    kept = index.updated(updates)
    assert sorted(kept.ids) == sorted(fresh.ids) and kept.n == fresh.n
    for cid in fresh.ids:
        assert np.array_equal(kept.keys_of(cid), fresh.keys_of(cid)), cid
    focus = {c.contact_id for c in edited} | {"N1"}
    assert kept.candidates(focus) == fresh.candidates(focus)


def test_what_is_kept_reads_back_and_another_version_is_refused(
    population: list[Contact],
) -> None:
    index = KeyIndex.build(population[:300])
    back = KeyIndex.from_bytes(index.to_bytes())
    assert back.ids == index.ids and np.array_equal(back.keys, index.keys)
    assert back.keys.shape == (300, len(KEYS))
    for bad in (b"", b"not an index", index.to_bytes()[:100]):
        with pytest.raises(ValueError):
            KeyIndex.from_bytes(bad)
    _, stats = whole_run(population[:300])
    assert stats.model is not None
    model = model_from_dict(model_to_dict(stats.model))
    assert model is not None and np.array_equal(model.m, stats.model.m)
    assert model.prior == stats.model.prior and np.array_equal(model.u, stats.model.u)
    assert model_from_dict({**model_to_dict(stats.model), "version": 0}) is None
    assert model_from_dict({**model_to_dict(stats.model), "m": [[0.5]]}) is None
    assert model_from_dict(None) is None
    assert isinstance(model_from_dict(model_to_dict(fellegi_sunter.Model())),
                      fellegi_sunter.Model)
