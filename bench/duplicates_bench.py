"""Benchmark of `worker.matching.duplicates`: speed, memory, and pair precision/recall.

Run: .venv/bin/python bench/duplicates_bench.py --contacts 100000

The data looks like a pediatric practice's Contact Manager: households with one last
name, one address, often one landline or one shared email, parents, grandparents, the
odd adult child who has a parent's first name (a negative case; both have a DOB on file,
30% carry "Jr." - without either, same name + same address is a duplicate by the rules),
~20% Spanish-named families with accents, plus placeholder emails, phones and DOBs that
front desks type when a parent has none. Then `dup_rate` of the records are injected
duplicates, each with one name perturbation and one shared identifier that the rules of
`worker.matching.duplicates` allow for it, and the truth is kept. The injector does not consult
the detector: a typo that happens to yield another real name (Dean -> Dan) is a miss.
Faker runs only to build pools once; records are sampled from the pools, so a million
contacts take about a minute, not hours.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import re
import resource
import sys
import time
import unicodedata
from collections import Counter
from datetime import date
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from faker import Faker  # noqa: E402
from faker.providers.person.en_US import Provider as EnNames  # noqa: E402
from faker.providers.person.es_MX import Provider as EsNames  # noqa: E402

from worker.matching import nicknames  # noqa: E402
from worker.matching.duplicates import DuplicateStats, find_duplicate_groups, name_key  # noqa: E402
from worker.model.records import Contact  # noqa: E402

NAME_KINDS = {  # name perturbation -> weight
    "exact": 8,
    "case_space": 15,
    "accents": 10,
    "first_typo": 20,
    "nickname": 15,
    "swapped": 10,
    "last_typo": 12,
    "middle": 10,
}
LINK_KINDS = {"email": 35, "phone": 25, "dob": 25, "address": 15}
# The address alone backs only an unchanged (or swapped) name: see worker.matching.duplicates.
ADDRESS_NAME_KINDS = frozenset({"exact", "case_space", "accents", "swapped"})
TRIPLE_SHARE = 0.12  # of duplicates that are a second copy of the same person
EMAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com",
                 "aol.com", "comcast.net")
PLACEHOLDER_EMAIL = "frontdesk@sunnyvalepeds.org"
PLACEHOLDER_PHONE = "(555) 010-0199"
PLACEHOLDER_DOB = date(2000, 1, 1)
_ACCENT = str.maketrans("aeiouAEIOU", "áéíóúÁÉÍÓÚ")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class _Pools:
    """Names, streets and postcodes, built once; every record is sampled from these."""

    def __init__(self, seed: int) -> None:
        fake = Faker("en_US")
        fake.seed_instance(seed)
        self.en_f = list(EnNames.first_names_female)
        self.en_f_cw = list(itertools.accumulate(EnNames.first_names_female.values()))
        self.en_m = list(EnNames.first_names_male)
        self.en_m_cw = list(itertools.accumulate(EnNames.first_names_male.values()))
        self.en_last = list(EnNames.last_names)
        self.en_last_cw = list(itertools.accumulate(EnNames.last_names.values()))
        self.es_f = list(EsNames.first_names_female)
        self.es_m = list(EsNames.first_names_male)
        self.es_last = list(EsNames.last_names)
        self.streets = sorted({fake.street_name() for _ in range(4000)})
        self.zips = sorted({fake.zipcode() for _ in range(3000)})
        self.cities = sorted({fake.city() for _ in range(800)})
        self.middles = ["Ann", "Marie", "Lee", "Lynn", "Jo", "James", "Michael", "Rose", "Grace"]


class _Maker:
    """Seeded generator of households, contacts and injected duplicates."""

    def __init__(self, seed: int) -> None:
        self.rng = Random(seed)
        self.pools = _Pools(seed)
        self.emails: set[str] = set()
        self.phones: set[str] = set()

    # -- identifiers -------------------------------------------------------------------

    def _ascii(self, text: str) -> str:
        folded = unicodedata.normalize("NFKD", text)
        return "".join(ch for ch in folded if ch.isascii() and ch.isalnum()).lower()

    def new_email(self, stem: str) -> str:
        rng = self.rng
        while True:
            sep = rng.choice(("", ".", "_"))
            email = f"{stem.replace('.', sep)}{rng.randint(1, 9999)}@{rng.choice(EMAIL_DOMAINS)}"
            if email not in self.emails:
                self.emails.add(email)
                return email

    def new_phone(self) -> str:
        rng = self.rng
        while True:
            digits = f"{rng.randint(201, 989)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"
            if digits not in self.phones:
                self.phones.add(digits)
                return self.format_phone(digits)

    def format_phone(self, digits: str) -> str:
        a, b, c = digits[-10:-7], digits[-7:-4], digits[-4:]
        style = self.rng.randrange(5)
        return (f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"{a}{b}{c}",
                f"+1 {a} {b} {c}")[style]

    def dob(self, first_year: int, last_year: int) -> date:
        start = date(first_year, 1, 1).toordinal()
        return date.fromordinal(self.rng.randint(start, date(last_year, 12, 31).toordinal()))

    # -- households ----------------------------------------------------------------------

    def household(self) -> list[list]:
        """One family's contacts as mutable field lists (id is set later)."""
        rng, p = self.rng, self.pools
        spanish = rng.random() < 0.2
        if spanish:
            last = rng.choice(p.es_last)
            female = lambda: rng.choice(p.es_f)  # noqa: E731
            male = lambda: rng.choice(p.es_m)  # noqa: E731
        else:
            last = rng.choices(p.en_last, cum_weights=p.en_last_cw)[0]
            female = lambda: rng.choices(p.en_f, cum_weights=p.en_f_cw)[0]  # noqa: E731
            male = lambda: rng.choices(p.en_m, cum_weights=p.en_m_cw)[0]  # noqa: E731
        unit = f" Apt {rng.randint(1, 40)}" if rng.random() < 0.2 else ""
        address = f"{rng.randint(1, 9999)} {rng.choice(p.streets)}{unit}"
        city, postcode = rng.choice(p.cities), rng.choice(p.zips)
        landline = self.new_phone() if rng.random() < 0.35 else ""
        people: list[tuple[str, str, date]] = [(female(), last, self.dob(1968, 2002))]
        if rng.random() < 0.8:  # second parent, now and then with another last name
            other = last if rng.random() < 0.85 else rng.choices(
                p.en_last, cum_weights=p.en_last_cw)[0]
            people.append((male(), other, self.dob(1965, 2000)))
        if rng.random() < 0.12:
            people.append((rng.choice((female, male))(), last, self.dob(1940, 1964)))
        if rng.random() < 0.06:  # an aunt, uncle or adult sibling
            people.append((rng.choice((female, male))(), last, self.dob(1975, 2004)))
        namesake = rng.random() < 0.01
        if namesake:  # an adult child named after a parent: not a duplicate
            name, _, born = people[-1]
            suffix = " Jr." if rng.random() < 0.3 else ""
            people.append((name, last + suffix, date(min(born.year + 24, 2005), born.month, 1)))
        shared = ""
        if len(people) > 1 and rng.random() < 0.25:
            shared = self.new_email(f"{self._ascii(last)}.family")
        seen: list[str] = []
        for i, (first, surname, born) in enumerate(people):  # no two Marys by chance
            key = name_key(first)[0]
            while not (namesake and i == len(people) - 1) and any(
                key == other or nicknames.are_related(key, other) for other in seen
            ):
                first = (female if rng.random() < 0.5 else male)()
                key = name_key(first)[0]
            seen.append(key)
            people[i] = (first, surname, born)
        rows = []
        for i, (first, surname, born) in enumerate(people):
            if shared and i < 2:
                email = shared
            elif rng.random() < 0.85:
                email = self.new_email(f"{self._ascii(first)}.{self._ascii(surname)}")
            else:
                email = ""
            phone = landline if landline and rng.random() < 0.5 else (
                self.new_phone() if rng.random() < 0.9 else "")
            roll = rng.random()
            if roll < 0.004:
                email = PLACEHOLDER_EMAIL
            elif roll < 0.007:
                phone = PLACEHOLDER_PHONE
            dob = born if rng.random() < 0.6 else None
            if dob is not None and rng.random() < 0.003:
                dob = PLACEHOLDER_DOB
            if namesake and i >= len(people) - 2:
                dob = born  # parent and namesake both have a DOB on file (else undecidable)
            rows.append([first, surname, email, dob, phone, address, city, postcode,
                         rng.random() < 0.95])
        return rows

    # -- duplicates ----------------------------------------------------------------------

    def typo(self, word: str, edits: int) -> str:
        rng = self.rng
        for _ in range(edits):
            chars = list(word)
            pos = rng.randrange(1, len(chars)) if len(chars) > 1 else 0
            op = rng.randrange(4)
            if op == 0:
                chars[pos] = rng.choice(_LETTERS)
            elif op == 1 and len(chars) > 3:
                del chars[pos]
            elif op == 2:
                chars.insert(pos, rng.choice(_LETTERS))
            elif pos + 1 < len(chars):
                chars[pos], chars[pos + 1] = chars[pos + 1], chars[pos]
            else:
                chars[pos] = rng.choice(_LETTERS)
            word = "".join(chars)
        return word

    def perturb_name(self, kind: str, first: str, last: str) -> tuple[str, str, str]:
        """A new (first, last) of the requested kind; falls back to case_space if impossible."""
        rng = self.rng
        if kind == "accents":
            if not (first + last).isascii():
                return self._strip(first), self._strip(last), kind
            if rng.random() < 0.5:
                return first[0] + first[1:].translate(_ACCENT), last, kind
            return first, last[0] + last[1:].translate(_ACCENT), kind
        if kind == "first_typo" and len(name_key(first)[0]) >= 3:
            edits = 2 if len(first) > 5 and rng.random() < 0.3 else 1
            new = self.typo(first, edits)
            if name_key(new)[0] != name_key(first)[0]:
                return new, last, kind
        if kind == "nickname":
            forms = nicknames.alternatives(name_key(first)[0])
            if forms:
                return rng.choice(forms).capitalize(), last, kind
        if kind == "swapped":
            return last, first, kind
        if kind == "last_typo" and len(name_key(last)[0]) >= 5:
            new = self.typo(last, 1)
            if name_key(new)[0] != name_key(last)[0]:
                return first, new, kind
        if kind == "middle" and " " not in first:
            return f"{first} {rng.choice(self.pools.middles)}", last, kind
        if kind == "exact":
            return first, last, kind
        style = rng.randrange(3)
        if style == 0:
            return first.upper(), last.upper(), "case_space"
        if style == 1:
            return f" {first.lower()}", f"{last.lower()}  ", "case_space"
        return f"{first}.", last.replace(" ", "  "), "case_space"

    def _strip(self, text: str) -> str:
        folded = unicodedata.normalize("NFKD", text)
        return "".join(ch for ch in folded if not unicodedata.combining(ch))

    def reformat_address(self, address: str) -> str:
        for long, short in (("Street", "St."), ("Avenue", "Ave"), ("Road", "Rd"),
                            ("Drive", "Dr."), ("Lane", "Ln"), ("Court", "Ct"), ("North", "N")):
            out = re.sub(rf"\b{long}\b", short, address)
            if out != address:
                return out.replace(" Apt ", " #")
        return address.upper().replace(" APT ", " Unit ")

    def duplicate(self, row: list, name_kind: str, link: str) -> tuple[list, str]:
        rng = self.rng
        first, last, email, dob, phone, address, city, postcode, _ = row
        new_first, new_last, name_kind = self.perturb_name(name_kind, first, last)
        stem = f"{self._ascii(new_first)}.{self._ascii(new_last)}"
        other_email = self.new_email(stem) if rng.random() < 0.5 else ""
        other_phone = self.new_phone() if rng.random() < 0.5 else ""
        new_dob = dob if rng.random() < 0.5 else None
        new_address, new_postcode = address, postcode
        if link == "email":
            new_email = email.upper() if rng.random() < 0.3 else email
            new_phone = other_phone
        elif link == "phone":
            new_email, new_phone = other_email, self.format_phone(
                "".join(ch for ch in phone if ch.isdigit()))
        elif link == "dob":
            new_email, new_phone, new_dob = other_email, other_phone, dob
        else:  # address: keep one of email/phone blank, as the rule requires
            new_address = self.reformat_address(address)
            new_postcode = f"{postcode}-{rng.randint(1000, 9999)}" if rng.random() < 0.3 \
                else postcode
            new_email, new_phone = (other_email, "") if rng.random() < 0.5 else ("", other_phone)
        if link != "address" and rng.random() < 0.3:
            new_address = f"{rng.randint(1, 9999)} {rng.choice(self.pools.streets)}"  # moved
        return [new_first, new_last, new_email, new_dob, new_phone, new_address, city,
                new_postcode, rng.random() < 0.4], name_kind

    def pick_link(self, row: list, name_kind: str) -> str:
        rng = self.rng
        feasible = {
            "email": bool(row[2]) and row[2] != PLACEHOLDER_EMAIL,
            "phone": bool(row[4]) and row[4] != PLACEHOLDER_PHONE,
            "dob": row[3] is not None and row[3] != PLACEHOLDER_DOB,
            "address": name_kind in ADDRESS_NAME_KINDS,
        }
        kinds = [k for k in LINK_KINDS if feasible[k]]
        if not kinds:
            return ""
        return rng.choices(kinds, weights=[LINK_KINDS[k] for k in kinds])[0]


def _make(n: int, seed: int, dup_rate: float):
    """Contacts, truth groups, and (original id, duplicate id, name kind, link) per copy."""
    maker = _Maker(seed)
    rng = maker.rng
    n_dup = round(n * dup_rate)
    rows: list[list] = []
    while len(rows) < n - n_dup:
        rows.extend(maker.household())
    del rows[n - n_dup :]
    n_base = len(rows)
    n_triples = round(n_dup * TRIPLE_SHARE)
    originals = rng.sample(range(n_base), n_dup - n_triples)
    originals += rng.sample(originals, n_triples)
    copies: list[tuple[int, int, str, str]] = []
    names, name_weights = list(NAME_KINDS), list(NAME_KINDS.values())
    for orig in originals:
        link = ""
        while not link:  # ends: the address can always back an unchanged name
            kind = rng.choices(names, weights=name_weights)[0]
            link = maker.pick_link(rows[orig], kind)
        dup, kind = maker.duplicate(rows[orig], kind, link)
        copies.append((orig, len(rows), kind, link))
        rows.append(dup)
    order = list(range(len(rows)))
    rng.shuffle(order)
    ids = [""] * len(rows)
    for position, row in enumerate(order):
        ids[row] = f"C{position + 1:07d}"
    contacts = [
        Contact(ids[i], r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8])
        for i, r in enumerate(rows)
    ]
    contacts.sort(key=lambda c: c.contact_id)
    groups: dict[int, set[str]] = {}
    for orig, dup, _, _ in copies:
        groups.setdefault(orig, {ids[orig]}).add(ids[dup])
    truth = sorted(tuple(sorted(g)) for g in groups.values())
    kinds = [(ids[o], ids[d], kind, link) for o, d, kind, link in copies]
    return contacts, truth, kinds


def make_contacts(
    n: int, seed: int = 7, dup_rate: float = 0.03
) -> tuple[list[Contact], list[tuple[str, ...]]]:
    """`n` synthetic contacts (duplicates included) and the true duplicate groups."""
    contacts, truth, _ = _make(n, seed, dup_rate)
    return contacts, truth


def _pairs(groups) -> set[tuple[str, str]]:
    return {pair for g in groups for pair in itertools.combinations(sorted(g), 2)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dup-rate", type=float, default=0.03)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    contacts, truth, kinds = _make(args.contacts, args.seed, args.dup_rate)
    gen_seconds = time.perf_counter() - t0
    gc.collect()
    rss_before = _rss_mb()

    stats = DuplicateStats()
    extra = {} if args.threshold is None else {"threshold": args.threshold}
    t0, c0 = time.perf_counter(), time.process_time()
    groups = find_duplicate_groups(contacts, stats=stats, **extra)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    predicted = _pairs(g.contact_ids for g in groups)
    true = _pairs(truth)
    hits = len(predicted & true)
    found_group = {cid: g.contact_ids for g in groups for cid in g.contact_ids}
    by_kind: dict[str, Counter] = {}
    for orig, dup, kind, link in kinds:
        ok = dup in found_group.get(orig, ())
        for key in (f"name:{kind}", f"link:{link}"):
            by_kind.setdefault(key, Counter())[ok] += 1
    result = {
        "contacts": len(contacts),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "contacts_per_second": round(len(contacts) / seconds),
        "generate_seconds": round(gen_seconds, 2),
        "rss_before_mb": round(rss_before),
        "peak_rss_mb": round(peak),
        "detection_rss_mb": round(peak - rss_before),
        "precision": round(hits / len(predicted), 4) if predicted else 1.0,
        "recall": round(hits / len(true), 4) if true else 1.0,
        "true_pairs": len(true),
        "predicted_pairs": len(predicted),
        "true_groups": len(truth),
        "found_groups": len(groups),
        "exact_groups": len(set(truth) & {g.contact_ids for g in groups}),
        "groups_of_3_plus": sum(len(g.contact_ids) >= 3 for g in groups),
        "stats": {k: getattr(stats, k) for k in DuplicateStats.__slots__},
        "recall_by_kind": {
            key: round(c[True] / (c[True] + c[False]), 4) for key, c in sorted(by_kind.items())
        },
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k:<22} {v}")
            else:
                print(f"{key:<24} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
