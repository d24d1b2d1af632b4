"""What "the same value" means for each contact field, before any two records are compared.

Why a module of its own: blocking, comparison and the household rules must all agree on
one normal form, and an unreadable value must become *missing* for that field only (a
DOB with month 13, an email without "@"), never drop the record.

- name: casefolded, accents stripped (NFKD), punctuation and spaces dropped ("O'Brien" =
  "obrien", "Mary-Jo" = "maryjo"); the words are kept too (a middle name, a double or
  married last name "Smith-Doe"). A trailing Jr/Sr/II/III/IV is split off as the suffix.
- email: trimmed, casefolded; gmail dots and "+tag" ignored; placeholders ("noemail@",
  the portal's dummy.com) and text without a usable "@" are missing.
- phone: digits only, an extension after "x" dropped, last 10 digits; fewer than 7
  digits, one repeated digit and 1234567890 are missing.
- address: street words abbreviated (Street -> st, North -> n), unit words dropped
  ("Apt 4" = "#4" = "4"), the first number is the house number; postcode upper-case
  without spaces, ZIP+4 cut to 5 digits.
- DOB: a date after 1900; text in YYYY-MM-DD or YYYYMMDD form is read leniently so a
  transposed day and month (2019-13-05) still compares as a day/month swap.
- phonetic key: Soundex of the compact name (blocking only: "Smyth" meets "Smith").
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date
from functools import lru_cache

_WORD = re.compile(r"[^\W_]+")
_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv", "2nd", "3rd"})
_NON_DIGIT = re.compile(r"[^0-9]+")
_GMAIL = frozenset({"gmail.com", "googlemail.com"})
PLACEHOLDER_LOCALS = frozenset(
    {
        "noemail", "no-email", "no_email", "nomail", "none", "na", "n/a", "no", "null",
        "unknown", "declined", "refused", "noreply", "no-reply", "donotreply",
        "do-not-reply", "test", "email", "mail",
    }
)
PLACEHOLDER_DOMAINS = frozenset({"dummy.com"})
PLACEHOLDER_PHONES = frozenset({"1234567890", "0123456789"})
_PLACEHOLDER_PHONE_BYTES = frozenset(p.encode() for p in PLACEHOLDER_PHONES)
_NOT_DIGIT_BYTES = bytes(b for b in range(256) if not 48 <= b <= 57)
PHONE_KEY_BASE = 10**10
_UNIT_WORDS = frozenset({"apt", "apartment", "unit", "suite", "ste", "no", "number", "flat"})
STREET_WORDS = {
    "street": "st", "avenue": "ave", "av": "ave", "road": "rd", "drive": "dr",
    "lane": "ln", "court": "ct", "boulevard": "blvd", "place": "pl", "terrace": "ter",
    "circle": "cir", "parkway": "pkwy", "highway": "hwy", "square": "sq", "trail": "trl",
    "way": "wy", "north": "n", "south": "s", "east": "e", "west": "w",
    "northeast": "ne", "northwest": "nw", "southeast": "se", "southwest": "sw",
    "mount": "mt", "fort": "ft", "saint": "st", "crescent": "cres", "close": "cl",
    "circuit": "cct",
}
_SOUNDEX = str.maketrans("bfpvcgjkqsxzdtlmnr", "111122222222334556")


def fold(raw: str) -> str:
    """Casefold and strip accents; the cheap path for plain ASCII."""
    text = raw.casefold()
    if text.isascii():
        return text
    return "".join(
        ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)
    )


@lru_cache(maxsize=200_000)
def name_key(raw: str) -> tuple[str, str, str]:
    """(compact form, words joined by spaces, generational suffix) of a name."""
    words = _WORD.findall(fold(raw or ""))
    suffix = ""
    while len(words) > 1 and words[-1] in _SUFFIXES:
        suffix = words.pop() + suffix
    if not words:
        return "", "", ""
    return "".join(words), " ".join(words), suffix


@lru_cache(maxsize=200_000)
def soundex(name: str) -> str:
    """Soundex of a compact name ("" stays ""): a blocking key that survives vowel typos."""
    if not name:
        return ""
    head = name[0]
    digits = name.translate(_SOUNDEX)
    out = [head]
    last = digits[0] if digits[0].isdigit() else ""
    for ch, raw in zip(digits[1:], name[1:], strict=True):
        if ch.isdigit():
            if ch != last:
                out.append(ch)
            last = ch
        elif raw not in "hw":
            last = ""
    return "".join(out)[:4].ljust(4, "0")


def normalise_email(raw: str) -> str:
    """Comparable email, or "" when it identifies nobody (blank, placeholder, unreadable)."""
    text = (raw or "").strip().casefold()
    at = text.rfind("@")
    if at <= 0 or at == len(text) - 1 or " " in text:
        return ""
    local, domain = text[:at], text[at + 1 :].rstrip(".")
    if "." not in domain:
        return ""
    if domain in _GMAIL:
        local = local.split("+", 1)[0].replace(".", "")
        domain = "gmail.com"
    if not local or local in PLACEHOLDER_LOCALS or domain in PLACEHOLDER_DOMAINS:
        return ""
    return f"{local}@{domain}"


def _phone_digits(raw: str) -> bytes:
    """The digits `normalise_phone` keeps (b"" for none), as ASCII bytes."""
    text = raw or ""
    for x in "xX":  # an extension after "x" dropped
        cut = text.find(x)
        if cut >= 0:
            text = text[:cut]
    digits = text.encode("ascii", "ignore").translate(None, _NOT_DIGIT_BYTES)[-10:]
    if len(digits) < 7 or digits.count(digits[0]) == len(digits):
        return b""
    return b"" if digits in _PLACEHOLDER_PHONE_BYTES else digits


def normalise_phone(raw: str) -> str:
    """Last 10 digits, or "" for something too short or obviously fake."""
    return _phone_digits(raw).decode()


def phone_key(raw: str) -> int:
    """`normalise_phone` as one integer (its length and its digits), -1 for "": a
    million phones coded by a numpy sort rather than a dict of strings."""
    digits = _phone_digits(raw)
    return len(digits) * PHONE_KEY_BASE + int(digits) if digits else -1


def normalise_postcode(raw: str) -> str:
    code = "".join(_WORD.findall((raw or "").upper()))
    if len(code) == 9 and code.isdigit():  # ZIP+4 written without its dash
        code = code[:5]
    return code


def address_parts(address: str) -> tuple[str, str]:
    """(house number, the rest as normalised words) of a street address."""
    words = [
        STREET_WORDS.get(word, word)
        for word in _WORD.findall(fold(address or ""))
        if word not in _UNIT_WORDS
    ]
    number = ""
    for pos, word in enumerate(words):
        if word[0].isdigit():
            number = word
            del words[pos]
            break
    return number, " ".join(words)


def normalise_address(address: str, postcode: str) -> str:
    """Address and postcode as one comparable key, or "" when either is missing."""
    code = normalise_postcode(postcode)
    number, street = address_parts(address)
    if not code or not (number or street):
        return ""
    return f"{number} {street}|{code}"


def dob_parts(value: object) -> tuple[int, int, int]:
    """(year, month, day) of a DOB; (0, 0, 0) when missing, a placeholder or unreadable.

    A `date` is taken as is; text in YYYY-MM-DD / YYYYMMDD form is read digit by digit,
    so "2019-13-05" is (2019, 13, 5): no real date, but still one day/month swap away
    from 2019-05-13, and "1923-11-64" one typed digit from 1923-11-14.
    """
    if isinstance(value, date):
        return (value.year, value.month, value.day) if value.year > 1900 else (0, 0, 0)
    if isinstance(value, str):
        digits = _NON_DIGIT.sub("", value)
        if len(digits) == 8:
            y, m, d = int(digits[:4]), int(digits[4:6]), int(digits[6:])
            if 1900 < y < 2100:
                return y, m, d
    return 0, 0, 0
