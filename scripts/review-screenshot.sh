#!/usr/bin/env bash
# docs/review-page.png, the picture of GET /review in docs/pacs.md: tests/test_review.py's Chromium test
# (a real server, the example children, B's radiograph misfiled under A) keeps its screenshot there.
#   bash scripts/review-screenshot.sh [OUT.png]        (needs Debian's chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-docs/review-page.png}")
command -v chromium >/dev/null || { echo "review-screenshot: needs chromium (apt-get install chromium)" >&2; exit 2; }
CXR_REID_REVIEW_SCREENSHOT="$OUT" "${PYTHON:-.venv/bin/python}" -m pytest -q \
    tests/test_review.py -k test_review_page_in_chromium_relabels_an_alert
ls -l "$OUT"
