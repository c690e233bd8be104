"""The entry points: thin modules in protein_performer/cli/, reached through the old module paths
(``python -m protein_performer.<cmd>`` and the console scripts ``protein_performer.<cmd>:main``)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import tomllib
import yaml

HYDRA_COMMANDS = ("ingest", "train", "export_attention", "contacts", "aa_similarity", "predict_contacts", "embed")


@pytest.mark.parametrize("command", [*HYDRA_COMMANDS, "demo"])
def test_old_module_path_is_the_cli_entry_point(command):
    shim = importlib.import_module(f"protein_performer.{command}")
    cli = importlib.import_module(f"protein_performer.cli.{command}")
    assert shim.main is cli.main
    assert shim.__all__[0] == "main"


def test_console_scripts_point_at_existing_mains(repo_root):
    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts  # the project installs console scripts
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("command", ["ingest", "contacts"])
def test_hydra_finds_the_package_configs(command, repo_root, tmp_path):
    """``--cfg job`` composes protein_performer/conf/<command>.yaml through the cli module's
    relative config_path (run from another directory, so nothing resolves against the cwd)."""
    proc = subprocess.run(
        [sys.executable, "-m", f"protein_performer.{command}", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    conf = yaml.safe_load((repo_root / "protein_performer" / "conf" / f"{command}.yaml").read_text())
    expected = {k: v for k, v in conf.items() if k not in ("defaults", "hydra")}
    assert {k: printed[k] for k in expected} == expected
    assert list(tmp_path.iterdir()) == []  # --cfg writes nothing


def test_demo_help_and_bad_option(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "protein_performer.demo", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "make demo" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "protein_performer.demo", "stages=ingest,fold", f"output_dir={tmp_path / 'o'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: demo: unknown stages ['fold']; choose from ('ingest', 'train', 'export', 'contacts', 'aa')"
    ]
    assert not (tmp_path / "o").exists()  # the options are checked before anything is written
