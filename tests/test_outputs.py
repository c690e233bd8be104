"""protein_performer.outputs: a file is renamed onto its target only when completely written (a
hidden ``.<name>.<pid>.partial`` before); an output folder is replaced only when the new one is
complete, with an atomic exchange or (where the system has none) two renames that the next run can
undo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protein_performer import outputs


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _read(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_output_keeps_the_old_file_and_no_temporary_on_an_error(tmp_path, durable):
    path = tmp_path / "sub" / "report.json"
    outputs.write_text(path, "old", durable=durable)  # the folder is created
    with pytest.raises(RuntimeError, match="boom"), outputs.atomic_output(path, durable=durable) as tmp:
        assert tmp == tmp_path / "sub" / f".report.json.{os.getpid()}.partial"
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_write_json_bytes_and_figure_round_trip(tmp_path):
    obj = {"a": [1, 2.5, None], "b": "\u00e9", "c": {"d": True}}
    outputs.write_json(tmp_path / "x.json", obj, indent=1)
    assert (tmp_path / "x.json").read_text(encoding="utf-8") == json.dumps(obj, indent=1)
    assert json.loads((tmp_path / "x.json").read_text()) == obj
    outputs.write_bytes(tmp_path / "x.bin", b"\x00\xff")
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\xff"
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    outputs.save_figure(fig, tmp_path / "x.png", dpi=20)
    plt.close(fig)
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.json", "x.png"]


def test_remove_temporaries_finds_this_and_older_versions_leftovers(tmp_path):
    pid = _dead_pid()
    names = [f".a.ckpt.{pid}.partial", ".a.ckpt.k2j4.tmp", f".b.json.{pid}.partial", "c.h5.partial", "a.ckpt"]
    _folder(tmp_path, dict.fromkeys(names, ""))
    removed = outputs.remove_temporaries(tmp_path, "*.ckpt", legacy=(".*.ckpt.*.tmp",))
    assert sorted(p.name for p in removed) == sorted([".a.ckpt.k2j4.tmp", f".a.ckpt.{pid}.partial"])
    outputs.remove_temporaries(tmp_path)  # any target's; never a resumable <output>.partial (not hidden)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "c.h5.partial"]


@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["exchange", "two-renames"])
def test_staged_directory_replaces_owned_entries_and_keeps_the_rest(tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:
        monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    out = _folder(
        tmp_path / "out", {"report.json": "old", "plots/a.png": "old a", "plots/b.png": "old b", "notes": "n"}
    )
    with outputs.staged_directory(out, ours={"report.json", "plots"}.__contains__) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.staging-")
        assert _read(out)["report.json"] == "old"  # the old output is untouched while the new one is written
        _folder(stage, {"report.json": "new", "plots/a.png": "new a"})
    assert _read(out) == {"report.json": "new", "plots/a.png": "new a", "notes": "n"}  # b.png was the old run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_while_staging_leaves_the_old_output(tmp_path):
    out = _folder(tmp_path / "out", {"report.json": "old"})
    with pytest.raises(RuntimeError, match="boom"), outputs.staged_directory(out) as stage:
        (stage / "report.json").write_text("half")
        raise RuntimeError("boom")
    assert _read(out) == {"report.json": "old"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_new_target_is_created_and_a_file_is_refused(tmp_path):
    with outputs.staged_directory(tmp_path / "a" / "new") as stage:
        (stage / "x").write_text("1")
    assert _read(tmp_path / "a" / "new") == {"x": "1"}
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not an output folder"):
        with outputs.staged_directory(tmp_path / "file"):
            pass


def test_exchange_swaps_two_folders_when_the_system_can(tmp_path):
    a, b = _folder(tmp_path / "a", {"x": "a"}), _folder(tmp_path / "b", {"y": "b"})
    if not outputs.exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: replace_directory uses two renames")
    assert _read(a) == {"y": "b"} and _read(b) == {"x": "a"}


def test_recover_after_a_kill_between_the_two_renames(tmp_path):
    """The fallback moved the old output aside and died before the new one took its place: the
    next run puts the old one back, then removes the dead run's stage."""
    pid = _dead_pid()
    out = tmp_path / "out"
    _folder(tmp_path / f".out.replaced-{pid}", {"report.json": "old", "notes": "n"})
    _folder(tmp_path / f".out.staging-{pid}", {"report.json": "new, never swapped in"})
    outputs.recover(out, ours={"report.json"}.__contains__)
    assert _read(out) == {"report.json": "old", "notes": "n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_moves_a_users_files_back_and_spares_a_live_run(tmp_path):
    """Killed after the swap, before the user's files moved from the old folder to the new one:
    they are moved back, not deleted. A stage whose process still runs is left alone."""
    out = _folder(tmp_path / "out", {"report.json": "new"})
    _folder(tmp_path / f".out.staging-{_dead_pid()}", {"report.json": "old", "notes": "n"})
    live = _folder(tmp_path / f".out.staging-{os.getppid()}", {"report.json": "being written"})
    outputs.recover(out, ours={"report.json"}.__contains__)
    assert _read(out) == {"report.json": "new", "notes": "n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
