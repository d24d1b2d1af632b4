"""Duplicate-contact detection: each perturbation it must see, each family it must not merge."""

from __future__ import annotations

import itertools
import logging
import random
from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.matching import duplicates, nicknames
from worker.matching.duplicates import (
    DuplicateGroup,
    DuplicateStats,
    find_duplicate_groups,
    normalise_address,
    normalise_email,
    normalise_phone,
    score_pair,
)
from worker.model.records import Contact

REASONS = {text for _, text in duplicates._REASONS}


def contact(
    cid: str,
    first: str,
    last: str,
    *,
    email: str = "",
    dob: date | None = None,
    phone: str = "",
    address: str = "",
    postcode: str = "",
    active: bool = True,
) -> Contact:
    return Contact(cid, first, last, email, dob, phone, address, "Springfield", postcode, active)


def one_group(*contacts: Contact) -> DuplicateGroup:
    groups = find_duplicate_groups(contacts)
    assert len(groups) == 1, groups
    return groups[0]


def no_groups(*contacts: Contact) -> None:
    assert find_duplicate_groups(contacts) == []


# -- positives: one per perturbation kind ----------------------------------------------


def test_case_and_whitespace_with_same_email() -> None:
    g = one_group(
        contact("c1", "Robert", "Smith", email="rsmith@example.net"),
        contact("c2", "  ROBERT ", "smith  ", email=" RSmith@Example.NET "),
    )
    assert g.contact_ids == ("c1", "c2")
    assert g.reasons == ("same name", "same email")
    assert g.score == pytest.approx(0.9)


def test_accents_and_punctuation_with_same_phone() -> None:
    g = one_group(
        contact("c1", "José", "Núñez-O'Brien", phone="(212) 555-0147"),
        contact("c2", "Jose", "Nunez OBrien", phone="+1 212.555.0147"),
    )
    assert g.reasons == ("same name", "same phone")


def test_typo_in_first_name_with_same_dob_and_different_email() -> None:
    g = one_group(
        contact("c1", "Katherine", "Lane", email="kl@one.org", dob=date(1984, 5, 2)),
        contact("c2", "Katherien", "Lane", email="kathy@two.org", dob=date(1984, 5, 2)),
    )
    assert g.reasons == ("first name typo", "same date of birth")
    assert g.score == pytest.approx(0.9 * 0.95)


def test_two_typos_in_a_long_first_name() -> None:
    assert score_pair(
        contact("c1", "Christopher", "Hale", email="ch@x.org"),
        contact("c2", "Christohpr", "Hale", email="ch@x.org"),
    )[1] == ("first name typo", "same email")


@pytest.mark.parametrize(
    ("short", "formal"),
    [("Bob", "Robert"), ("Liz", "Elizabeth"), ("Bill", "William"), ("Kate", "Katherine"),
     ("Peggy", "Margaret"), ("Sara", "Sarah")],
)
def test_nickname_with_same_email(short: str, formal: str) -> None:
    g = one_group(
        contact("c1", formal, "Okafor", email="okafor.home@gmail.com"),
        contact("c2", short, "Okafor", email="Okafor.Home+portal@gmail.com"),
    )
    assert g.reasons == ("nickname", "same email")


def test_first_and_last_swapped_with_same_phone() -> None:
    g = one_group(
        contact("c1", "Nguyen", "Linh", phone="415-555-0199"),
        contact("c2", "Linh", "Nguyen", phone="4155550199"),
    )
    assert g.reasons == ("first/last swapped", "same phone")


def test_same_phone_different_email() -> None:
    g = one_group(
        contact("c1", "Ana", "Silva", email="ana@old.com", phone="555-201-3344"),
        contact("c2", "Ana", "Silva", email="ana@new.com", phone="(555) 201 3344 x12"),
    )
    assert g.reasons == ("same name", "same phone")


def test_same_dob_different_email() -> None:
    g = one_group(
        contact("c1", "Omar", "Haddad", email="omar@a.com", dob=date(1979, 2, 28)),
        contact("c2", "omar", "HADDAD", email="oh@b.com", dob=date(1979, 2, 28)),
    )
    assert g.reasons == ("same name", "same date of birth")


def test_last_name_typo_and_middle_name() -> None:
    assert score_pair(
        contact("c1", "Grace", "Whitfield", dob=date(1990, 1, 9)),
        contact("c2", "Grace", "Whitfeild", dob=date(1990, 1, 9)),
    )[1] == ("last name typo", "same date of birth")
    assert score_pair(
        contact("c1", "Mary", "Jones", email="mj@x.org"),
        contact("c2", "Mary Ann", "Jones", email="mj@x.org"),
    )[1] == ("middle name", "same email")


def test_same_address_with_same_name_counts_despite_formatting() -> None:
    g = one_group(
        contact("c1", "Dana", "Park", email="dana@x.org", address="12 North Main Street Apt 4",
                postcode="02139-4307"),
        contact("c2", "Dana", "Park", address="12 N. Main St #4", postcode="02139"),
    )
    assert g.reasons == ("same name", "same address")


def test_inactive_contacts_are_included() -> None:
    one_group(
        contact("c1", "Lee", "Wong", email="lw@x.org"),
        contact("c2", "Lee", "Wong", email="lw@x.org", active=False),
    )


def test_three_records_one_group_with_weakest_link_score() -> None:
    a = contact("c10", "Elizabeth", "Reyes", email="reyes@x.org", dob=date(1988, 3, 3))
    b = contact("c2", "Liz", "Reyes", email="reyes@x.org", phone="555 300 1212")
    c = contact("c3", "Elisabet", "Reyes", phone="555-300-9999", dob=date(1988, 3, 3))
    assert score_pair(b, c) == (0.0, ())  # a nickname *and* a typo: linked only through a
    g = one_group(c, a, b)
    assert g.contact_ids == ("c10", "c2", "c3")  # plain string order
    assert g.score == pytest.approx(0.85 * 0.95)  # the 2-edit typo, the weakest link
    assert g.score == min(score_pair(a, b)[0], score_pair(a, c)[0])
    assert g.reasons == ("nickname", "first name typo", "same email", "same date of birth")


# -- negatives: families and namesakes ----------------------------------------------------


def test_siblings_at_one_address_sharing_a_landline() -> None:
    home = {"address": "4 Elm Court", "postcode": "30301", "phone": "404-555-0100"}
    no_groups(
        contact("c1", "Emma", "Brown", **home),
        contact("c2", "Ella", "Brown", **home),
        contact("c3", "Noah", "Brown", **home),
    )


def test_spouses_sharing_one_email() -> None:
    no_groups(
        contact("c1", "John", "Smith", email="smithfamily@gmail.com"),
        contact("c2", "Mary", "Smith", email="smith.family@gmail.com"),
        contact("c3", "Mark", "Smith", email="smithfamily@gmail.com"),  # Mary/Mark: two names
    )


def test_two_john_smiths_with_nothing_else_shared() -> None:
    no_groups(
        contact("c1", "John", "Smith", email="js1@a.com", dob=date(1970, 1, 1), phone="5550001111"),
        contact("c2", "John", "Smith", email="js2@b.com", dob=date(1982, 6, 9), phone="5550002222"),
    )


def test_mother_and_daughter_with_one_name() -> None:
    no_groups(
        contact("c1", "Mary", "Jones", email="mary60@a.com", dob=date(1960, 4, 1),
                phone="555-111-2222", address="9 Oak Rd", postcode="10001"),
        contact("c2", "Mary", "Jones", email="mary90@b.com", dob=date(1990, 8, 1),
                phone="555-333-4444", address="9 Oak Road", postcode="10001"),
    )


def test_mother_and_daughter_sharing_email_with_different_first_names() -> None:
    no_groups(
        contact("c1", "Linda", "Park", email="parks@x.org", dob=date(1962, 1, 1)),
        contact("c2", "Jennifer", "Park", email="parks@x.org"),
    )


def test_father_and_junior_at_one_address_sharing_a_phone() -> None:
    home = {"address": "1 Bay St", "postcode": "94110", "phone": "415-555-0111"}
    no_groups(contact("c1", "John", "Moore", **home), contact("c2", "John", "Moore Jr.", **home))


def test_nickname_or_typo_with_only_the_address_is_family() -> None:
    home = {"address": "77 Pine Ave", "postcode": "60601"}
    no_groups(contact("c1", "Katherine", "Lane", **home), contact("c2", "Katie", "Lane", **home))
    no_groups(contact("c1", "Jayden", "Cruz", **home), contact("c2", "Jaydin", "Cruz", **home))


def test_dobless_record_never_joins_father_and_son() -> None:
    home = {"address": "5 Hill Rd", "postcode": "73301"}
    father = contact("c1", "Paul", "Grant", dob=date(1950, 5, 5), email="pg@x.org", **home)
    son = contact("c2", "Paul", "Grant", dob=date(1978, 5, 1), phone="5559990000", **home)
    copy = contact("c3", "Paul", "Grant", email="pg@x.org", phone="5559990000")
    stats = DuplicateStats()
    groups = find_duplicate_groups([father, son, copy], stats=stats)
    # Equal scores: the tie goes to the lower ids, deterministically.
    assert [g.contact_ids for g in groups] == [("c1", "c3")]
    assert stats.conflicting_links == 1


def test_placeholder_email_is_no_evidence_and_is_counted() -> None:
    people = [
        contact(f"c{i:03d}", f"Name{i}", "Lee", email="frontdesk@practice.org") for i in range(60)
    ]
    people += [
        contact("x1", "Pat", "Kim", email="frontdesk@practice.org"),
        contact("x2", "Pat", "Kim", email="FrontDesk@practice.org"),
        contact("y1", "Sam", "Ruiz", email="noemail@gmail.com"),
        contact("y2", "Sam", "Ruiz", email="noemail@gmail.com"),
    ]
    stats = DuplicateStats()
    assert find_duplicate_groups(people, stats=stats) == []
    assert stats.placeholder_values == 1
    assert stats.placeholder_contacts == 62


def test_empty_names_never_match() -> None:
    no_groups(contact("c1", "", "", email="a@b.com"), contact("c2", "", "", email="a@b.com"))


# -- threshold, order, normalisers, logging -----------------------------------------------


def test_threshold_filters_weak_pairs_and_is_validated() -> None:
    pair = (
        contact("c1", "Katherine", "Lane", dob=date(1984, 5, 2)),
        contact("c2", "Katherien", "Lane", dob=date(1984, 5, 2)),
    )
    assert find_duplicate_groups(pair, threshold=0.85)
    assert find_duplicate_groups(pair, threshold=0.86) == []
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError):
            find_duplicate_groups(pair, threshold=bad)


def test_normalisers() -> None:
    assert normalise_email(" J.Doe+kids@GoogleMail.com ") == "jdoe@gmail.com"
    assert normalise_email("j.doe@yahoo.com") == "j.doe@yahoo.com"
    for junk in ("", "N/A", "none@x.com", "kid@dummy.com", "@x.com", "x@"):
        assert normalise_email(junk) == ""
    assert normalise_phone("+1 (212) 555-0147 ext. 9") == "2125550147"
    for junk in ("", "555", "0000000000", "123-456-7890"):
        assert normalise_phone(junk) == ""
    assert normalise_address("12 North Main Street, Apt. 4", "02139-4307") == normalise_address(
        "12 n main st #4", "02139"
    )
    assert normalise_address("12 Main St", "") == ""


def test_nickname_table_is_symmetric_and_sized() -> None:
    assert nicknames.PAIR_COUNT >= 150
    for a, b in [("bob", "robert"), ("liz", "elizabeth"), ("bill", "william"), ("bob", "rob")]:
        assert nicknames.are_related(a, b) and nicknames.are_related(b, a)
    assert not nicknames.are_related("christopher", "christina")  # both "chris", not each other
    for group in nicknames.GROUPS:  # the table is stored in the compared form
        assert all(duplicates.name_key(name)[0] == name for name in group)
    assert all(duplicates.name_key(name)[0] == name for name in nicknames.KNOWN_GIVEN_NAMES)


def test_logs_counts_only(caplog: pytest.LogCaptureFixture) -> None:
    people = [
        contact("c1", "Zelda", "Quorn", email="zq@secret.org", phone="5551234999"),
        contact("c2", "Zelda", "Quorn", email="zq@secret.org", dob=date(1971, 7, 7)),
    ]
    with caplog.at_level(logging.DEBUG, logger="worker.matching.duplicates"):
        assert find_duplicate_groups(people)
    text = caplog.text.lower()
    assert "duplicates:" in text
    for phi in ("zelda", "quorn", "zq@", "5551234999", "1971"):
        assert phi not in text


def _random_population(seed: int, n: int) -> list[Contact]:
    """Tiny pools so that names and identifiers collide a lot."""
    rng = random.Random(seed)
    firsts = ["Robert", "Bob", "Rob", "Roberta", "Mary", "Mark", "Marie", "Jon", "John",
              "Jonh", "Lee", "Kim", "Smith", "Ana", "Anna", "Liz", "Elizabeth", "Jose", "José"]
    lasts = ["Smith", "Smyth", "Lee", "Kim", "Garcia", "García", "Jones", "Robert", "Mary"]
    emails = ["", "a@x.org", "b@x.org", "c@gmail.com", "c+x@gmail.com", "d@y.net"]
    phones = ["", "555-000-1111", "5550001111", "555 000 2222", "(555) 000-3333"]
    addresses = [("", ""), ("1 Main St", "10001"), ("1 Main Street", "10001"), ("2 Oak Rd", "2")]
    dobs = [None, date(1980, 1, 1), date(1980, 1, 2), date(1990, 5, 5)]
    out = []
    for i in range(n):
        address, postcode = rng.choice(addresses)
        out.append(contact(f"c{i:04d}", rng.choice(firsts), rng.choice(lasts),
                           email=rng.choice(emails), dob=rng.choice(dobs),
                           phone=rng.choice(phones), address=address, postcode=postcode))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blocking_finds_what_all_pairs_would(seed: int) -> None:
    people = _random_population(seed, 160)
    blocked = find_duplicate_groups(people, max_block=10**6)
    table = duplicates._Table(people)
    score = duplicates._scorer(table, duplicates.DEFAULT_THRESHOLD)
    pairs = []
    for i, j in itertools.combinations(range(len(people)), 2):
        hit = score(i, j)
        if hit is not None:
            pairs.append((i, j, *hit))
    brute = duplicates._group(table.ids, table.dob, pairs, DuplicateStats())
    assert blocked == brute
    assert blocked  # the pools are built to collide


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_output_does_not_depend_on_input_order(rnd: random.Random) -> None:
    people = _random_population(7, 120)
    expected = find_duplicate_groups(people)
    rnd.shuffle(people)
    assert find_duplicate_groups(people) == expected
    assert [g.contact_ids[0] for g in expected] == sorted(g.contact_ids[0] for g in expected)


_text = st.text(max_size=12)
_contacts = st.builds(
    Contact,
    contact_id=st.text(min_size=0, max_size=4),
    first_name=st.one_of(_text, st.sampled_from(["Bob", "Robert", "Ann", "", " "])),
    last_name=st.one_of(_text, st.sampled_from(["Smith", "", "Jr.", "Ng III"])),
    email=st.one_of(_text, st.sampled_from(["a@b.c", "A@B.C", "@", "x@gmail.com", ""])),
    dob=st.one_of(st.none(), st.dates(min_value=date(1, 1, 1), max_value=date(2100, 1, 1))),
    phone=st.one_of(_text, st.sampled_from(["555-123-4567", "5551234567", "x", ""])),
    address=_text,
    city=_text,
    postcode=st.one_of(_text, st.just("12345")),
    active=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_contacts, max_size=12))
def test_never_crashes_and_is_well_formed(people: list[Contact]) -> None:
    groups = find_duplicate_groups(people)
    for g in groups:
        assert len(g.contact_ids) >= 2
        assert list(g.contact_ids) == sorted(set(g.contact_ids))
        assert 0.0 < g.score <= 1.0
        assert g.reasons and set(g.reasons) <= REASONS
    assert [g.contact_ids for g in groups] == sorted(g.contact_ids for g in groups)
