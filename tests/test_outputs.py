"""protein_performer.outputs: an output folder is replaced only when the new one is complete, with
an atomic exchange or (where the system has none) two renames that the next run can undo."""

from __future__ import annotations

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
