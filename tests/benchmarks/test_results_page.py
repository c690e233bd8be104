"""benchmarks/RESULTS.md and results/studies.md are generated from benchmarks/results/*.json (make results).

These tests keep the committed pages equal to what the JSON files give (nobody edits them by hand), check
that every floor row names the JSON its number comes from, and that every JSON is a record of the one format
of benchmarks/_record.py.
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

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def report():
    """benchmarks/report.py, imported as `python benchmarks/report.py` runs it: benchmarks/ on the path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        yield importlib.import_module("report")


@pytest.fixture(scope="module")
def record(report):
    return importlib.import_module("_record")


def floor_rows(page: str) -> list[list[str]]:
    section = page.split("## Floors", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ")
    ]
    return rows[1:]  # the header


def test_committed_pages_are_what_the_json_gives(report):
    pages = report.pages()
    assert (BENCH / "RESULTS.md").read_text() == pages[BENCH / "RESULTS.md"], "RESULTS.md is stale: run `make results`"
    studies = pages[BENCH / "results" / "studies.md"]
    assert (BENCH / "results" / "studies.md").read_text() == studies, "studies.md is stale: run `make results`"


def test_check_mode_exits_zero_on_the_committed_tree():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--check"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


def test_page_is_short_and_marked_generated():
    page = (BENCH / "RESULTS.md").read_text()
    assert page.count("\n") <= 320  # current numbers only: one part per benchmark, no history
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


def test_the_newest_run_of_a_configuration_replaces_the_older(report, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    newer = json.loads((results / "ingest.json").read_text())
    newer["date"] = "2099-01-01T00:00:00+00:00"
    newer["floors"]["plain_2w_vs_1w"]["value"] = 1.234
    (results / "ingest.json").write_text(json.dumps(newer))
    attention = json.loads((results / "attention.json").read_text())
    attention["date"] = "2000-01-01T00:00:00+00:00"  # older than attention.json's configuration
    row = next(
        r for r in attention["rows"] if (r["method"], r["mode"], r["length"]) == ("favor_softmax", "causal", 8192)
    )
    row["median_ratio"] = 0.001
    (results / "attention_old_copy.json").write_text(json.dumps(attention))
    rows = {(r[0], r[1]): r for r in floor_rows(report.results_page(results))}
    assert rows[("2, 10", "2 workers / 1 worker throughput (plain file)")][3:5] == ["1.234", "**FAIL**"]
    causal = rows[("3", "CPU L=8192 causal FAVOR+ softmax / SDPA time")]
    assert causal[3] != "0.001" and "attention.json" in causal[5] and "2099" not in causal[5]


def test_latest_keeps_one_run_per_configuration(record):
    runs = [
        {"k": "a", "date": "2026-11-28T04:00:00+00:00", "v": 1},
        {"k": "a", "date": "2026-11-30T12:16:00+00:00", "v": 2},
        {"k": "b", "date": "2026-11-29", "v": 3},
        {"k": "a", "date": "2026-11-29T23:59:59+00:00", "v": 4},
        {"k": "b", "date": "2026-11-28T23:00:00-02:00", "v": 5},  # 2026-11-29 01:00 UTC: after the day's midnight
    ]
    kept = record.latest(runs, lambda r: r["k"])
    assert [r["v"] for r in kept] == [2, 5]
    assert record.newest(runs)["v"] == 2 and record.newest([]) is None


def test_dates_have_one_format(record):
    assert record.day("2026-12-07T04:55:07+00:00") == "2026-12-07 04:55 UTC"
    assert record.day("2026-12-07T06:55:07+02:00") == "2026-12-07 04:55 UTC"
    assert record.day("2026-11-28") == "2026-11-28"
    assert record.when(record.now()).tzinfo is not None
    with pytest.raises(ValueError):
        record.when("2026-11-30 12:16 UTC")  # the old formats are gone


def test_every_results_json_is_a_record(record, report):
    paths = sorted((BENCH / "results").glob("*.json")) + sorted((BENCH / "results").glob("gpu/*.json"))
    assert len(paths) >= 10
    for path in paths:
        rec = json.loads(path.read_text())
        assert rec["benchmark"] in report.SECTIONS, path
        for field in ("command", "machine", "date"):
            assert isinstance(rec[field], str) and rec[field], (path, field)
        assert record.when(rec["date"]).utcoffset().total_seconds() == 0, path


def test_write_stamps_and_checks_a_record(record, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCH / "embed.py"), "--n", "10"])
    rec = record.record("embed", {"value": 1.5})
    assert list(rec)[:4] == ["benchmark", "command", "machine", "date"] and rec["value"] == 1.5
    assert rec["command"] == "python benchmarks/embed.py --n 10"
    assert " cores, torch " in rec["machine"]
    record.write(tmp_path / "embed.json", rec)
    assert json.loads((tmp_path / "embed.json").read_text()) == rec
    with pytest.raises(ValueError, match="lacks"):
        record.write(tmp_path / "bad.json", {k: v for k, v in rec.items() if k != "machine"})
    with pytest.raises(ValueError):
        record.write(tmp_path / "bad.json", dict(rec, date="2026-11-30 12:16 UTC"))


def test_a_record_without_a_section_is_refused(report, tmp_path):
    (tmp_path / "mystery.json").write_text(json.dumps({"benchmark": "mystery", "date": "2026-12-01"}))
    with pytest.raises(ValueError, match="mystery"):
        report.results_page(tmp_path)


def test_a_benchmark_without_records_is_not_measured(report, tmp_path):
    """With no JSON at all, every part says so and every floor is NOT MEASURED with the command that measures it."""
    page = report.results_page(tmp_path)
    assert "## Family-level contacts (issue 12)" in page and "Not measured yet." in page
    rows = floor_rows(page)
    assert len(rows) >= 20
    for _issue, what, _limit, measured, verdict, where in rows:
        assert (measured, verdict) == ("-", "**NOT MEASURED**"), what
        assert where.startswith(("none yet: `python benchmarks/", "none yet: `bash benchmarks/")), what


def test_floor_verdicts(record):
    assert record.Floor("3", "x", 0.4, True, 0.404, None).verdict == "FAIL"
    assert record.Floor("3", "x", 0.15, True, 0.15, None).verdict == "PASS"
    assert record.Floor("2", "x", 1.6, False, 1.7, None).verdict == "PASS"
    assert record.Floor("11", "x", 1.0, False, None, None).verdict == "NOT MEASURED"
