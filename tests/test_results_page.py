"""benchmarks/RESULTS.md and results/studies.md are generated from benchmarks/results/*.json (make results).

These tests keep the committed pages equal to what the JSON files give (nobody edits them by hand) and check
that every floor row names the JSON its number comes from.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def floor_rows(page: str) -> list[list[str]]:
    section = page.split("## Floors", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ")
    ]
    return rows[1:]  # the header


def test_committed_pages_are_what_the_json_gives(report):
    assert (BENCH / "RESULTS.md").read_text() == report.results_page(), "RESULTS.md is stale: run `make results`"
    studies = report.studies_page(report.study_runs())
    assert (BENCH / "results" / "studies.md").read_text() == studies, "studies.md is stale: run `make results`"


def test_check_mode_exits_zero_on_the_committed_tree():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--check"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


def test_page_is_short_and_marked_generated():
    page = (BENCH / "RESULTS.md").read_text()
    assert page.count("\n") <= 250
    assert "do not edit" in page.splitlines()[2]


def test_every_floor_row_has_a_source_json():
    rows = floor_rows((BENCH / "RESULTS.md").read_text())
    assert len(rows) >= 20
    for _issue, what, limit, measured, verdict, where in rows:
        assert verdict in ("**PASS**", "**FAIL**", "**NOT MEASURED**"), what
        if verdict == "**NOT MEASURED**":  # no run yet (the command is named), or the run lacks the case
            assert measured == "-" and (where.startswith("none yet: `") or where.startswith("not in [")), what
            if where.startswith("none yet"):
                continue
        link = re.search(r"\(results/([^)]+\.json)\)", where)
        assert link, f"floor {what!r} names no JSON"
        path = BENCH / "results" / link.group(1)
        assert path.is_file(), f"floor {what!r}: {path} is missing"
        json.loads(path.read_text())
        if verdict == "**NOT MEASURED**":
            continue
        value, bound = float(measured), float(limit.split()[1])
        passed = value <= bound if limit.startswith("<=") else value >= bound
        assert (verdict == "**PASS**") == passed, what


def test_the_newest_run_of_a_configuration_replaces_the_older(report, tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    newer = json.loads((results / "ingest.json").read_text())
    newer["date"] = "2099-01-01 00:00 UTC"
    newer["floors"]["plain_2w_vs_1w"]["value"] = 1.234
    (results / "ingest.json").write_text(json.dumps(newer))
    attention = json.loads((results / "attention.json").read_text())
    attention["meta"]["date"] = "2000-01-01T00:00:00+00:00"  # older than attention.json's configuration
    row = next(
        r for r in attention["rows"] if (r["method"], r["mode"], r["length"]) == ("favor_softmax", "causal", 8192)
    )
    row["median_ratio"] = 0.001
    (results / "attention_old_copy.json").write_text(json.dumps(attention))
    monkeypatch.setattr(report, "RESULTS", results)
    rows = {(r[0], r[1]): r for r in floor_rows(report.results_page())}
    assert rows[("2, 10", "2 workers / 1 worker throughput (plain file)")][3:5] == ["1.234", "**FAIL**"]
    causal = rows[("3", "CPU L=8192 causal FAVOR+ softmax / SDPA time")]
    assert causal[3] != "0.001" and "attention.json" in causal[5] and "2099" not in causal[5]


def test_latest_keeps_one_run_per_configuration(report):
    runs = [
        {"k": "a", "date": "2026-11-28T04:00:00+00:00", "v": 1},
        {"k": "a", "date": "2026-11-30 12:16 UTC", "v": 2},
        {"k": "b", "date": "2026-11-29", "v": 3},
        {"k": "a", "date": "2026-11-29T00:00:00+00:00", "v": 4},
    ]
    kept = report.latest(runs, lambda r: r["k"], lambda r: r["date"])
    assert [r["v"] for r in kept] == [2, 3]


def test_floor_verdicts(report):
    assert report.Floor("3", "x", 0.4, True, 0.404, None).verdict == "FAIL"
    assert report.Floor("3", "x", 0.15, True, 0.15, None).verdict == "PASS"
    assert report.Floor("2", "x", 1.6, False, 1.7, None).verdict == "PASS"
    assert report.Floor("11", "x", 1.0, False, None, None).verdict == "NOT MEASURED"
