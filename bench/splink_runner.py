"""Splink 5 (duckdb backend) on the same contacts, for the side-by-side table.

Set up the way Splink's deduplication tutorial recommends: name comparisons with term
frequency adjustments, a DOB comparison, email, phone, address, postcode and city;
prior from deterministic rules, u by random sampling, m by EM sessions blocked on
names and on DOB; prediction blocks on DOB with either name, email, phone, postcode
with house number and swapped names; clusters at the match threshold. Only the data
cleaning every Splink user does first is applied (lower case, trimmed, phone digits).
Needs the `bench` extra.
"""

from __future__ import annotations

import logging
import re
from datetime import date
from typing import Any

from worker.model.records import Contact

THRESHOLD = 0.9
_DIGITS = re.compile(r"\D+")


def _dob_text(value: Any) -> str | None:
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) and len(_DIGITS.sub("", value)) == 8:
        digits = _DIGITS.sub("", value)
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"  # invalid ones become null
    return None


def frame(contacts: list[Contact]) -> Any:
    import pandas as pd

    rows = []
    for c in contacts:
        words = (c.address or "").lower().split()
        number = words[0] if words and words[0][:1].isdigit() else None
        phone = _DIGITS.sub("", c.phone or "")[-10:] or None
        rows.append({
            "unique_id": c.contact_id,
            "first_name": (c.first_name or "").strip().lower() or None,
            "surname": (c.last_name or "").strip().lower() or None,
            "dob": _dob_text(c.dob),
            "email": (c.email or "").strip().lower() or None,
            "phone": phone,
            "address": " ".join(words) or None,
            "street_number": number,
            "postcode": (c.postcode or "").strip().lower() or None,
            "city": (c.city or "").strip().lower() or None,
        })
    return pd.DataFrame(rows)


def groups(contacts: list[Contact], threshold: float = THRESHOLD) -> list[tuple[str, ...]]:
    """Splink's clusters of two or more contacts."""
    import splink.comparison_library as cl
    from splink import Linker, SettingsCreator, block_on
    from splink.backends.duckdb import DuckDBAPI

    logging.getLogger("splink").setLevel(logging.ERROR)
    df = frame(contacts)
    has_email = df["email"].notna().any()
    has_phone = df["phone"].notna().any()
    comparisons = [
        cl.NameComparison("first_name").configure(term_frequency_adjustments=True),
        cl.NameComparison("surname").configure(term_frequency_adjustments=True),
        cl.DateOfBirthComparison("dob", input_is_string=True),
        cl.JaroWinklerAtThresholds("address", [0.9, 0.7]),
        cl.ExactMatch("postcode"),
        cl.ExactMatch("city").configure(term_frequency_adjustments=True),
    ]
    if has_email:
        comparisons.append(cl.EmailComparison("email"))
    if has_phone:
        comparisons.append(cl.ExactMatch("phone"))
    rules = [
        block_on("first_name", "dob"),
        block_on("surname", "dob"),
        block_on("postcode", "street_number"),
        "l.first_name = r.surname and l.surname = r.first_name",
        block_on("first_name", "surname"),
    ]
    if has_email:
        rules.append(block_on("email"))
    if has_phone:
        rules.append(block_on("phone"))
    settings = SettingsCreator(
        link_type="dedupe_only",
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=rules,
        retain_intermediate_calculation_columns=False,
    )
    db_api = DuckDBAPI()
    sdf = db_api.register(df)
    linker = Linker(sdf, settings, log_level=logging.ERROR)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("first_name", "surname", "dob")], recall=0.7)
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("first_name", "surname"), record_sample_proportion=1.0)
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("dob"), record_sample_proportion=1.0)
    pairs = linker.inference.predict(threshold_match_probability=threshold)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        pairs, threshold_match_probability=threshold).as_pandas_dataframe()
    out: dict[Any, list[str]] = {}
    for cid, uid in zip(clusters["cluster_id"], clusters["unique_id"], strict=True):
        out.setdefault(cid, []).append(str(uid))
    return sorted(tuple(sorted(g)) for g in out.values() if len(g) > 1)
