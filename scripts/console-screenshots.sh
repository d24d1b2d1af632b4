#!/usr/bin/env bash
# Regenerate the console screenshots in docs/ (dashboard, findings, family, contact page): the
# browser tests save them while they drive headless Chromium through the pages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-services.sh
OPRECON_TEST_SCREENSHOTS_DIR="$PWD/docs" .venv/bin/pytest -q \
  "tests/web/test_web_browser.py::test_operator_opens_a_family_from_the_dashboard_and_silences_a_finding" \
  "tests/web/test_web_browser.py::test_staff_follow_a_finding_that_names_only_contacts_to_their_families"
ls -l docs/console-*.png
