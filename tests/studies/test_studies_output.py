"""Where the studies write: their --out-dir (default ./study_results), never the package."""

from __future__ import annotations

import json
from pathlib import Path

import protein_performer
from protein_performer.studies import redraw, study_cli


def _write(args, tmp_path) -> None:
    result = {"study": "demo_study", "value": 1.5}
    study_cli.write_study(
        "demo_study", result, args, lambda path: path.write_bytes(b"png"), lambda r: f"## demo\nvalue {r['value']}"
    )


def test_default_output_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = redraw.parse_args([])
    assert args.out_dir == tmp_path / "study_results" and args.markdown == tmp_path / "study_results" / "studies.md"
    _write(args, tmp_path)
    out = tmp_path / "study_results"
    assert sorted(p.name for p in out.iterdir()) == ["demo_study.json", "demo_study.png", "studies.md"]
    assert json.loads((out / "demo_study.json").read_text()) == {"study": "demo_study", "value": 1.5}
    assert (
        "<!-- study:demo_study -->\n## demo\nvalue 1.5\n<!-- /study:demo_study -->" in (out / "studies.md").read_text()
    )
    package = Path(protein_performer.__file__).resolve().parent
    assert package not in args.out_dir.resolve().parents  # never the source tree


def test_explicit_out_dir_and_markdown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = redraw.parse_args(
        ["--out-dir", str(tmp_path / "results" / "studies"), "--markdown", str(tmp_path / "results" / "s.md")]
    )
    _write(args, tmp_path)
    assert (tmp_path / "results" / "studies" / "demo_study.json").exists()
    assert (tmp_path / "results" / "s.md").exists()
    assert not (tmp_path / "study_results").exists()
    only_dir = redraw.parse_args(["--out-dir", str(tmp_path / "elsewhere")])
    assert only_dir.markdown == tmp_path / "elsewhere" / "studies.md"
