"""Household contacts with re-registered parents and household traps, with the truth.

Why: a pediatric practice's Contact Manager is full of families, and the hard cases for
a duplicate matcher are the people who are *not* duplicates but share almost everything:

- traps (never one person): spouses with similar names (Daniel/Danielle, Paul/Paula,
  Joel/Joelle) sharing an address, a landline and often a family email; a parent and an
  adult child with one name a generation apart (Jr/Sr, the suffix written 30% of the
  time) at one address with one landline; common-name strangers (John Smith, Maria
  Garcia) across the practice; twins are not planted.
- duplicates (re-registrations of one parent, 12% of them a third record): name
  perturbations (case and spacing, accents, one or two typos, nickname, first/last
  swapped, middle name added, married name "Smith-Doe" or a new last name with the same
  email and phone), DOB perturbations (missing, one-digit typo, transposed digits,
  day/month swapped, unreadable text such as month 13), email (case and spaces, new,
  missing, one typo, unreadable), phone (reformatted, new, missing), address (reformatted,
  unit written differently, moved, missing). Each copy keeps at least two pieces of
  evidence a front-desk person would use (an email, a phone, a DOB within a typo, or
  the same name and address), so a careful human could find it.

The generator does not consult the matcher. Faker's name lists are sampled by their
frequencies (so common names are common). Output: contacts, true groups, per-copy kinds
and the trap pairs (for per-trap false-pair counts).
"""

from __future__ import annotations

import itertools
import unicodedata
from dataclasses import dataclass, field
from datetime import date
from random import Random

from faker import Faker
from faker.providers.person.en_US import Provider as EnNames
from faker.providers.person.es_MX import Provider as EsNames

from worker.model.records import Contact

SIMILAR_SPOUSES = (
    ("Daniel", "Danielle"), ("Eric", "Erica"), ("Paul", "Paula"), ("Michael", "Michelle"),
    ("Carl", "Carla"), ("Jesse", "Jessie"), ("Francis", "Frances"), ("Adrian", "Adriana"),
    ("Julian", "Julia"), ("Gabriel", "Gabriela"), ("Mario", "Maria"), ("Joel", "Joelle"),
    ("Glenn", "Glenda"), ("Bobby", "Bobbie"), ("Gene", "Jean"), ("Dean", "Deanna"),
    ("Justin", "Justine"), ("Louis", "Louise"), ("Antonio", "Antonia"),
    ("Patrick", "Patricia"), ("George", "Georgina"), ("Ryan", "Ryann"),
)
COMMON = (("John", "Smith"), ("Maria", "Garcia"), ("Michael", "Johnson"),
          ("Jennifer", "Williams"), ("James", "Brown"), ("Jose", "Hernandez"))
NICKNAMES = {
    "robert": "Bob", "william": "Bill", "elizabeth": "Liz", "jennifer": "Jenny",
    "michael": "Mike", "christopher": "Chris", "katherine": "Kate", "margaret": "Peggy",
    "richard": "Rick", "james": "Jim", "joseph": "Joe", "thomas": "Tom", "daniel": "Dan",
    "anthony": "Tony", "patricia": "Trish", "rebecca": "Becky", "jessica": "Jess",
    "samantha": "Sam", "alexander": "Alex", "nicholas": "Nick", "matthew": "Matt",
    "andrew": "Andy", "stephanie": "Steph", "deborah": "Debbie", "susan": "Sue",
    "kimberly": "Kim", "victoria": "Vicky", "jonathan": "Jon", "benjamin": "Ben",
    "francisco": "Paco", "jose": "Pepe", "guadalupe": "Lupe", "alejandro": "Alex",
    "eduardo": "Lalo", "ignacio": "Nacho", "jesus": "Chuy", "timothy": "Tim",
    "kenneth": "Ken", "ronald": "Ron", "donald": "Don", "steven": "Steve", "gregory": "Greg",
}
DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "aol.com")
MIDDLES = ("Ann", "Marie", "Lee", "Lynn", "Jo", "James", "Michael", "Rose", "Grace")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ACCENT = str.maketrans("aeiouAEIOU", "áéíóúÁÉÍÓÚ")


@dataclass
class Person:
    first: str
    last: str
    dob: object
    email: str
    phone: str
    address: str
    city: str
    postcode: str
    active: bool = True
    kind: str = ""


@dataclass
class Data:
    contacts: list[Contact]
    truth: list[tuple[str, ...]]
    copies: list[tuple[str, str, str]]  # (original id, copy id, kinds)
    traps: dict[str, set[tuple[str, str]]] = field(default_factory=dict)


class _Maker:
    def __init__(self, seed: int) -> None:
        self.rng = Random(seed)
        fake = Faker("en_US")
        fake.seed_instance(seed)
        self.en_f, self.en_f_w = list(EnNames.first_names_female), list(
            itertools.accumulate(EnNames.first_names_female.values()))
        self.en_m, self.en_m_w = list(EnNames.first_names_male), list(
            itertools.accumulate(EnNames.first_names_male.values()))
        self.en_l, self.en_l_w = list(EnNames.last_names), list(
            itertools.accumulate(EnNames.last_names.values()))
        self.es_f, self.es_m, self.es_l = (list(EsNames.first_names_female),
                                           list(EsNames.first_names_male),
                                           list(EsNames.last_names))
        self.streets = sorted({fake.street_name() for _ in range(4000)})
        self.zips = sorted({fake.zipcode() for _ in range(3000)})
        self.cities = sorted({fake.city() for _ in range(300)})
        self.used_emails: set[str] = set()
        self.used_phones: set[str] = set()

    # -- values --------------------------------------------------------------------------

    def ascii(self, text: str) -> str:
        folded = unicodedata.normalize("NFKD", text)
        return "".join(ch for ch in folded if ch.isascii() and ch.isalnum()).lower()

    def email(self, stem: str) -> str:
        rng = self.rng
        while True:
            sep = rng.choice(("", ".", "_"))
            out = f"{stem.replace('.', sep)}{rng.randint(1, 9999)}@{rng.choice(DOMAINS)}"
            if out not in self.used_emails:
                self.used_emails.add(out)
                return out

    def phone(self) -> str:
        rng = self.rng
        while True:
            digits = f"{rng.randint(201, 989)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"
            if digits not in self.used_phones:
                self.used_phones.add(digits)
                return self.fmt_phone(digits)

    def fmt_phone(self, digits: str) -> str:
        a, b, c = digits[-10:-7], digits[-7:-4], digits[-4:]
        return self.rng.choice((f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}",
                                f"{a}{b}{c}", f"+1 {a} {b} {c}"))

    def dob(self, lo: int, hi: int) -> date:
        start = date(lo, 1, 1).toordinal()
        return date.fromordinal(self.rng.randint(start, date(hi, 12, 31).toordinal()))

    def address(self) -> str:
        rng = self.rng
        unit = f" Apt {rng.randint(1, 40)}" if rng.random() < 0.2 else ""
        return f"{rng.randint(1, 9999)} {rng.choice(self.streets)}{unit}"

    # -- households ----------------------------------------------------------------------

    def household(self, traps: list[tuple[str, int, int]], base: int) -> list[Person]:
        """One family; trap pairs are recorded as (kind, row a, row b) from `base`."""
        rng = self.rng
        spanish = rng.random() < 0.2
        if spanish:
            last = rng.choice(self.es_l)

            def female() -> str:
                return rng.choice(self.es_f)

            def male() -> str:
                return rng.choice(self.es_m)
        else:
            last = rng.choices(self.en_l, cum_weights=self.en_l_w)[0]

            def female() -> str:
                return rng.choices(self.en_f, cum_weights=self.en_f_w)[0]

            def male() -> str:
                return rng.choices(self.en_m, cum_weights=self.en_m_w)[0]
        address, city, postcode = self.address(), rng.choice(self.cities), rng.choice(self.zips)
        landline = self.phone() if rng.random() < 0.4 else ""
        family = self.email(f"{self.ascii(last)}.family") if rng.random() < 0.25 else ""
        roll = rng.random()
        names: list[tuple[str, str, date]] = []
        if roll < 0.003:
            f, surname = rng.choice(COMMON)
            last = surname
            names.append((f, last, self.dob(1968, 2002)))
        else:
            names.append((female(), last, self.dob(1968, 2002)))
        spouse_similar = rng.random() < 0.04
        if spouse_similar:
            a, b = rng.choice(SIMILAR_SPOUSES)
            names[0] = (b, last, names[0][2])
            names.append((a, last, self.dob(1965, 2000)))
            traps.append(("similar-name spouses", base, base + 1))
        elif rng.random() < 0.8:
            other = last if rng.random() < 0.85 else rng.choices(
                self.en_l, cum_weights=self.en_l_w)[0]
            names.append((male(), other, self.dob(1965, 2000)))
        if rng.random() < 0.12:
            names.append((rng.choice((female, male))(), last, self.dob(1935, 1962)))
        junior = rng.random() < 0.03
        if junior:  # an adult child named after a parent, living at home
            parent = rng.randrange(len(names))
            first, surname, born = names[parent]
            born = self.dob(1945, 1980)
            names[parent] = (first, surname, born)
            year = min(born.year + rng.randint(20, 32), 2006)
            names.append((first, surname, self.dob(year, year)))
            traps.append(("Jr/Sr one name", base + parent, base + len(names) - 1))
        seen = set()
        for pos, (first, surname, born) in enumerate(names):
            if junior and pos == len(names) - 1:
                continue
            while self.ascii(first) in seen:
                first = (female if rng.random() < 0.5 else male)()
            seen.add(self.ascii(first))
            names[pos] = (first, surname, born)
        people = []
        for pos, (first, surname, born) in enumerate(names):
            if family and pos < 2:
                email = family
            elif rng.random() < 0.88:
                email = self.email(f"{self.ascii(first)}.{self.ascii(surname)}")
            else:
                email = ""
            if landline and rng.random() < 0.6:
                phone = landline
            else:
                phone = self.phone() if rng.random() < 0.9 else ""
            dob: object = born if rng.random() < 0.75 else None
            if junior and pos in (len(names) - 1, traps[-1][1] - base):
                dob = born  # both on file: without a DOB one name at one address is
                # undecidable, and a real practice asks for it
            if junior and pos == len(names) - 1 and rng.random() < 0.3:
                surname = f"{surname} Jr."
            people.append(Person(first, surname, dob, email, phone, address, city, postcode,
                                 rng.random() < 0.95))
        if family and len(people) >= 2 and not spouse_similar:
            traps.append(("shared family email", base, base + 1))
        if landline and len(people) >= 2 and people[0].phone == landline == people[1].phone:
            traps.append(("shared landline", base, base + 1))
        return people

    # -- re-registrations ----------------------------------------------------------------

    def typo(self, word: str) -> str:
        rng = self.rng
        if len(word) < 3:
            return word + rng.choice(_LETTERS)
        chars = list(word)
        pos = rng.randrange(1, len(chars))
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
        return "".join(chars)

    def copy(self, p: Person) -> Person:
        rng = self.rng
        kinds = []
        first, last = p.first, p.last
        roll = rng.random()
        if roll < 0.12:
            first, last = first.upper(), last.upper()
            kinds.append("case")
        elif roll < 0.2:
            first, last = first[0] + first[1:].translate(_ACCENT), last
            kinds.append("accents")
        elif roll < 0.38:
            first = self.typo(first) if rng.random() < 0.8 else self.typo(self.typo(first))
            kinds.append("first typo")
        elif roll < 0.5 and self.ascii(first) in NICKNAMES:
            first = NICKNAMES[self.ascii(first)]
            kinds.append("nickname")
        elif roll < 0.58:
            first, last = last, first
            kinds.append("swapped names")
        elif roll < 0.68:
            last = self.typo(last)
            kinds.append("last typo")
        elif roll < 0.74 and " " not in first:
            first = f"{first} {rng.choice(MIDDLES)}"
            kinds.append("middle name")
        elif roll < 0.82:
            other = rng.choices(self.en_l, cum_weights=self.en_l_w)[0]
            last = f"{last}-{other}" if rng.random() < 0.6 else other
            kinds.append("married name")
        else:
            kinds.append("same name")
        married = kinds[-1] == "married name"
        # Evidence a person at the desk would use; a married name keeps email and phone.
        dob: object = p.dob
        droll = rng.random()
        if p.dob is None:
            pass
        elif droll < 0.2:
            dob = None
            kinds.append("dob missing")
        elif droll < 0.3:
            dob = self.dob_typo(p.dob)  # type: ignore[arg-type]
            kinds.append("dob typo")
        elif droll < 0.36 and p.dob.day <= 12 and p.dob.day != p.dob.month:  # type: ignore
            d = p.dob
            dob = date(d.year, d.day, d.month)  # type: ignore[union-attr]
            kinds.append("day/month swap")
        elif droll < 0.39 and p.dob.day > 12:  # type: ignore[union-attr]
            d = p.dob
            dob = f"{d.year}-{d.day:02d}-{d.month:02d}"  # type: ignore[union-attr]
            kinds.append("unreadable dob")
        email, phone = p.email, p.phone
        eroll = rng.random()
        if married or not email:
            pass
        elif eroll < 0.1:
            email = f"  {email.upper()} "
            kinds.append("email case")
        elif eroll < 0.3:
            email = self.email(f"{self.ascii(first)}.{self.ascii(last)}")
            kinds.append("new email")
        elif eroll < 0.45:
            email = ""
            kinds.append("email missing")
        elif eroll < 0.5:
            at = email.index("@")
            email = self.typo(email[:at]) + email[at:]
            kinds.append("email typo")
        elif eroll < 0.53:
            email = email.replace("@", " at ")
            kinds.append("unreadable email")
        proll = rng.random()
        if married or not phone:
            if phone:
                phone = self.fmt_phone("".join(ch for ch in phone if ch.isdigit()))
        elif proll < 0.45:
            phone = self.fmt_phone("".join(ch for ch in phone if ch.isdigit()))
        elif proll < 0.7:
            phone = self.phone()
            kinds.append("new phone")
        else:
            phone = ""
            kinds.append("phone missing")
        address, city, postcode = p.address, p.city, p.postcode
        aroll = rng.random()
        if aroll < 0.25:
            address, city, postcode = self.address(), rng.choice(self.cities), rng.choice(
                self.zips)
            kinds.append("moved")
        elif aroll < 0.35:
            address, postcode = "", ""
            kinds.append("address missing")
        elif aroll < 0.65:
            address = (address.replace(" Street", " St.").replace(" Avenue", " Ave")
                       .replace(" Apt ", " #").upper())
        return Person(first, last, dob, email, phone, address, city, postcode,
                      rng.random() < 0.5, ", ".join(kinds))

    def dob_typo(self, d: date) -> object:
        rng = self.rng
        text = f"{d.year:04d}{d.month:02d}{d.day:02d}"
        for _ in range(20):
            if rng.random() < 0.5:
                pos = rng.randrange(2, 8)
                new = text[:pos] + str(rng.randrange(10)) + text[pos + 1:]
            else:
                pos = rng.randrange(2, 7)
                new = text[:pos] + text[pos + 1] + text[pos] + text[pos + 2:]
            if new == text:
                continue
            try:
                return date(int(new[:4]), int(new[4:6]), int(new[6:]))
            except ValueError:
                continue
        return d

    def findable(self, orig: Person, dup: Person) -> bool:
        """At least two pieces of evidence a careful person at the desk would use."""
        def norm_e(e: str) -> str:
            return e.strip().lower()

        def digits(x: str) -> str:
            return "".join(ch for ch in x if ch.isdigit())[-10:]

        evidence = 0
        evidence += bool(orig.email) and norm_e(orig.email) == norm_e(dup.email)
        evidence += bool(orig.phone) and digits(orig.phone) == digits(dup.phone)
        evidence += orig.dob is not None and dup.dob is not None
        evidence += bool(dup.address) and orig.postcode == dup.postcode
        return evidence >= 2


def make(n: int, seed: int = 7, dup_rate: float = 0.03) -> Data:
    """About `n` contacts: households plus `dup_rate` re-registrations."""
    maker = _Maker(seed)
    rng = maker.rng
    n_dup = round(n * dup_rate)
    people: list[Person] = []
    trap_rows: list[tuple[str, int, int]] = []
    while len(people) < n - n_dup:
        people.extend(maker.household(trap_rows, len(people)))
    n_base = len(people)
    originals = rng.sample(range(n_base), n_dup)
    triples = originals[: round(n_dup * 0.12)]
    copies: list[tuple[int, int, str]] = []
    for orig in originals + triples:
        for _ in range(10):
            dup = maker.copy(people[orig])
            if maker.findable(people[orig], dup):
                break
        copies.append((orig, len(people), dup.kind))
        people.append(dup)
    order = list(range(len(people)))
    rng.shuffle(order)
    ids = [""] * len(people)
    for pos, row in enumerate(order):
        ids[row] = f"C{pos + 1:07d}"
    contacts = [Contact(ids[k], p.first, p.last, p.email, p.dob, p.phone,  # type: ignore
                        p.address, p.city, p.postcode, p.active)
                for k, p in enumerate(people)]
    contacts.sort(key=lambda c: c.contact_id)
    groups: dict[int, set[str]] = {}
    for orig, dup, _ in copies:
        groups.setdefault(orig, {ids[orig]}).add(ids[dup])
    traps: dict[str, set[tuple[str, str]]] = {}
    for kind, a, b in trap_rows:
        pair = (ids[a], ids[b]) if ids[a] < ids[b] else (ids[b], ids[a])
        traps.setdefault(kind, set()).add(pair)
    return Data(contacts, sorted(tuple(sorted(g)) for g in groups.values()),
                [(ids[o], ids[d], kind) for o, d, kind in copies], traps)
