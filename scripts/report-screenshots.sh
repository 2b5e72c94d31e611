#!/usr/bin/env bash
# docs/img/audit-report.png, risk-report.png and review-conflicts.png, the pictures of the audit and
# risk reports and of the review page's duplicate conflicts: tests/test_report_pages.py's Chromium
# tests draw them from the code as it is (the risk report of the random-weight test model).
#   bash scripts/report-screenshots.sh [OUT_DIR]        (needs Debian's chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-docs/img}")
command -v chromium >/dev/null || { echo "report-screenshots: needs chromium (apt-get install chromium)" >&2; exit 2; }
CXR_REID_SCREENSHOTS="$OUT" "${PYTHON:-.venv/bin/python}" -m pytest -q -p no:cacheprovider tests/test_report_pages.py \
    -k "reads_right or grouped_per_collection"
ls -l "$OUT"/audit-report.png "$OUT"/risk-report.png "$OUT"/review-conflicts.png
