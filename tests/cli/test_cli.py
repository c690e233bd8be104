"""The entry points: thin modules in protein_performer/cli/, the console scripts
(``protein_performer.cli.<cmd>:main``) and ``python -m protein_performer.<cmd>`` (a contract: each
``protein_performer/<cmd>.py`` is only the ``__main__`` hook that runs the cli module's main)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest
import tomllib
import yaml

from protein_performer.cli import demo

HYDRA_COMMANDS = ("ingest", "train", "export_attention", "contacts", "aa_similarity", "predict_contacts", "embed")


@pytest.mark.parametrize("command", [*HYDRA_COMMANDS, "demo", "family_contacts"])
def test_python_m_module_is_only_the_main_hook(command, repo_root):
    """``protein_performer/<cmd>.py``: a docstring and ``if __name__ == "__main__"`` running
    ``protein_performer.cli.<cmd>.main``; importing it defines nothing (no second import path)."""
    tree = ast.parse((repo_root / "protein_performer" / f"{command}.py").read_text())
    docstring, hook = tree.body
    assert isinstance(docstring, ast.Expr) and f"python -m protein_performer.{command}" in docstring.value.value
    assert ast.unparse(hook) == (
        f"if __name__ == '__main__':\n    from protein_performer.cli.{command} import main\n    main()"
    )
    assert callable(importlib.import_module(f"protein_performer.cli.{command}").main)


def test_console_scripts_point_at_the_cli_mains(repo_root):
    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted("pp-" + c.replace("_", "-") for c in (*HYDRA_COMMANDS, "family_contacts"))
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module == "protein_performer.cli." + name.removeprefix("pp-").replace("-", "_"), name
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("command", ["ingest", "contacts"])
def test_hydra_finds_the_package_configs(command, repo_root, tmp_path):
    """``--cfg job`` composes protein_performer/conf/<command>.yaml through the cli module's
    relative config_path (run from another directory, so nothing resolves against the cwd), both
    through ``python -m protein_performer.<cmd>`` and as the console script calls it."""
    conf = yaml.safe_load((repo_root / "protein_performer" / "conf" / f"{command}.yaml").read_text())
    expected = {k: v for k, v in conf.items() if k not in ("defaults", "hydra")}
    console_script = f"from protein_performer.cli.{command} import main; main()"
    printed = []
    for how in (["-m", f"protein_performer.{command}"], ["-c", console_script]):
        proc = subprocess.run(
            [sys.executable, *how, "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        printed.append(proc.stdout)
        assert {k: v for k, v in yaml.safe_load(proc.stdout).items() if k in expected} == expected
    assert printed[0] == printed[1]
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


def test_demo_pipeline_is_data(tmp_path, capsys):
    """The demo's stages are a table of commands templated by its options and files: every template
    fills in, steps= adds the three short-run settings, and a bad steps= stops before any stage."""
    files = {name: str(tmp_path / path) for name, path in demo.FILES.items()}
    values = {**demo.OPTIONS, **files, "data": str(demo.SAMPLE_DATA)}
    for stage in demo.STAGES:
        for args in demo.stage_commands(stage, values):
            assert args[0].startswith("protein_performer.") and not any("$" in a for a in args), args
    (train,) = demo.stage_commands("train", values)
    assert not any(a.startswith("trainer.max_steps") for a in train)
    (train,) = demo.stage_commands("train", {**values, "steps": "40"})
    assert train[-3:] == ["trainer.max_steps=40", "trainer.val_check_interval=40", "module.warmup_steps=0"]
    with pytest.raises(SystemExit):
        demo.main(["steps=many", f"output_dir={tmp_path / 'o'}"])
    assert capsys.readouterr().err.strip() == "error: demo: steps=many is not a whole number"
    assert not (tmp_path / "o").exists()
