"""`oprecon duplicates` on a contacts export, run as an operator would: a re-registration
whose DOB was typed with day and month swapped (month 13) is still read and found, two
spouses with similar names sharing everything else are not; --json carries
`contact_ids`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.procs import base_env, oprecon

HEADER = "contact_id,first_name,last_name,email,dob,phone,address,city,postcode,active," \
         "patient_id,updated_at\n"


def test_month_13_is_a_missing_dob_not_a_missing_contact(tmp_path: Path) -> None:
    export = tmp_path / "contacts.csv"
    export.write_text(
        HEADER
        + "C1,Ines,Mora,ines.mora@example.org,1990-05-13,555-333-1212,4 Elm St,Salem,97301,"
          "true,,2026-01-01T00:00:00+00:00\n"
        + "C2,INES,Mora,,1990-13-05,(555) 333 1212,,Salem,,false,,2026-02-01T00:00:00+00:00\n"
        + "C3,Daniel,Mora,mora.family@example.org,1961-02-03,555-333-1212,4 Elm St,Salem,"
          "97301,true,,2026-01-01T00:00:00+00:00\n"
        + "C4,Danielle,Mora,mora.family@example.org,1963-08-09,555-333-1212,4 Elm St,Salem,"
          "97301,true,,2026-01-01T00:00:00+00:00\n",
        encoding="utf-8",
    )
    env = base_env(OPRECON_STATE_DB_URL=f"sqlite:///{tmp_path}/s.sqlite",
                   OPRECON_METRICS_PORT="0")
    done = oprecon("duplicates", "--contacts", str(export), "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    findings = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [f["contact_ids"] for f in findings] == [["C1", "C2"]]  # never Daniel/Danielle
    assert "day and month swapped" in findings[0]["detail"]
    text = oprecon("duplicates", "--contacts", str(export), env=env, cwd=tmp_path)
    assert text.returncode == 0 and "1 duplicate group(s) among 4 contacts" in text.stdout
