"""MODEL_CARD.md's plain-language box is computed from the card's own measured tables: each "of 100
misfiled images" figure is a TAR and each "of 1,000 correct filings" a delivered FAR of section 2
(hospital A) or section 5 (test patients), rounded. A table that changes without the box fails."""

from __future__ import annotations

import re

from app.server_process import ROOT

CARD = (ROOT / "MODEL_CARD.md").read_text()


def _cells(line: str) -> list[str]:
    return [
        cell.strip().strip("*").strip() for cell in line.strip().lstrip(">").strip().strip("|").split("|")
    ]


def _section(title: str) -> str:
    start = CARD.index(title)
    end = CARD.find("\n## ", start + 1)
    return CARD[start : end if end > 0 else None]


def _box() -> dict[tuple[str, str], tuple[str, str]]:
    box = CARD[CARD.index("> **In plain words") : CARD.index("> **What to expect at your site**")]
    rows = [_cells(line) for line in box.splitlines() if line.startswith("> | ")][1:]
    return {(row[0], row[1]): (row[2], row[3]) for row in rows if not set(row[0]) <= {"-"}}


def _hospital_a_rows() -> dict[str, list[str]]:
    table = _section("## 2. What `adapt` adds at an unseen site")
    rows = [_cells(line) for line in table.splitlines() if line.startswith("| nih-cxr14")]
    return {f"{row[1]}|{row[2]}": row for row in rows}


def _number(text: str) -> float:
    return float(re.search(r"[0-9]*\.?[0-9]+", text).group())


def test_hospital_a_figures_are_the_section_2_table_rounded() -> None:
    box, rows = _box(), _hospital_a_rows()
    base = rows["base, its own thresholds|-"]
    assert "promised 1e-3" in base[5]
    assert (
        box[("shipped, its own thresholds, hospital A", "1e-3")][1] == f"about {1000 * _number(base[5]):.0f}"
    )

    calibrated = rows["base + calibrate (AS-norm)|946"]
    assert box[("site-calibrated (`calibrate`, AS-norm), hospital A", "1e-2")] == (
        f"about {100 * _number(calibrated[4]):.0f}",
        f"about {1000 * _number(calibrated[5]):.0f}",
    )

    adapted = rows["adapt + calibrate|946"]
    assert box[("adapted (`adapt`, then calibrated), hospital A", "1e-2")] == (
        f"about {100 * _number(adapted[4]):.0f}",
        f"about {1000 * _number(adapted[5]):.0f}",
    )
    tar, far = re.search(r"TAR@FAR1e-3 ([0-9.]+) at FAR ([0-9.]+)", adapted[5]).groups()
    assert box[("adapted (`adapt`, then calibrated), hospital A", "1e-3")] == (
        f"about {100 * float(tar):.0f}",
        f"about {1000 * float(far):.0f}",
    )


def test_test_patient_figures_are_the_section_5_table_rounded() -> None:
    section = _section("## 5. The shipped default on test patients of its own sets")
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = _cells(lines[0])
    column = header.index("TAR@FAR1e-3")
    tars = [_number(_cells(line)[column]) for line in lines[1:] if "test patients of" in line]
    assert len(tars) == 4
    caught, wrong = _box()[("shipped, test patients of the hospitals it trained on", "1e-3")]
    assert caught == f"about {100 * min(tars):.0f} to {100 * max(tars):.0f}"
    assert wrong == "about 1"  # the FAR of its own calibration, where it holds
    assert (
        "cxr-reid-ir18w32-224-7515b147b54c" in section and "cxr-reid-ir18w32-224-7515b147b54c" in CARD[:3000]
    )
