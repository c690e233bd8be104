"""No silent traps in the training configuration: mixed precision on a CPU without native bf16
becomes 32-true (with a warning), and every other valid-but-pathological choice is one warning
line saying what to set. The machine's facts (cores, bf16) are fixed here, so the tests do not
depend on the machine they run on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from hydra import compose, initialize_config_dir

from protein_performer.errors import UserError
from protein_performer.training import config_checks
from protein_performer.training.config_checks import check_training_config, cpu_has_native_bf16

CONF = Path(__file__).resolve().parents[2] / "conf"
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n\nprocessor\t: 1\nflags\t\t: fpu {extra}\n"


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=demo", "data.root=x", "run_dir=x", *overrides])


@pytest.fixture
def machine(monkeypatch):
    """A 2-core machine; ``machine(bf16=...)`` sets whether its CPU has native bfloat16."""
    monkeypatch.setattr(config_checks, "cpu_cores", lambda: 2)

    def set_bf16(bf16: bool):
        monkeypatch.setattr(config_checks, "cpu_has_native_bf16", lambda: bf16)

    set_bf16(False)
    return set_bf16


def warnings_of(caplog, cfg, **kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="protein_performer.training.config_checks"):
        out = check_training_config(cfg, **kw)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert all("\n" not in line for line in lines)
    return out, lines


def test_native_bf16_from_cpu_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert cpu_has_native_bf16(X86.format(extra="avx512_bf16")) is True
    assert cpu_has_native_bf16(X86.format(extra="amx_bf16 amx_tile")) is True
    assert cpu_has_native_bf16(X86.format(extra="avx512_vnni")) is False  # AVX-512 alone: bf16 is emulated
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n") is True  # Arm v8.6
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd\n") is False
    assert cpu_has_native_bf16("") is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # oneDNN capped below the bf16 instructions
    assert cpu_has_native_bf16(X86.format(extra="avx512_bf16")) is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_has_native_bf16(X86.format(extra="amx_bf16")) is True


def test_ddp_on_cpu_without_bf16_trains_in_32_true(machine, caplog):
    """The issue's trap: trainer=ddp inherits bf16-mixed from the GPU config."""
    cfg = make_cfg(*DDP_CPU)
    assert cfg.trainer.precision == "bf16-mixed"
    out, lines = warnings_of(caplog, cfg)
    assert out.trainer.precision == "32-true" and cfg.trainer.precision == "bf16-mixed"  # a copy is changed
    assert len(lines) == 1
    assert "trainer.precision=bf16-mixed on a CPU without native bfloat16" in lines[0]
    assert "trainer.precision=32-true is used" in lines[0] and "cpu_precision=keep" in lines[0]
    # forced: kept, still warned
    out, lines = warnings_of(caplog, make_cfg(*DDP_CPU, "cpu_precision=keep"))
    assert out.trainer.precision == "bf16-mixed" and len(lines) == 1 and "cpu_precision=keep" in lines[0]
    # 16-mixed the same way (Lightning would turn it into bf16-mixed on a CPU)
    out, lines = warnings_of(caplog, make_cfg(*DDP_CPU, "trainer.precision=16-mixed"))
    assert out.trainer.precision == "32-true" and len(lines) == 1
    # other ranks decide the same, silently
    out, lines = warnings_of(caplog, make_cfg(*DDP_CPU), rank_zero=False)
    assert out.trainer.precision == "32-true" and lines == []


def test_native_bf16_cpu_and_plain_configs_are_left_alone(machine, caplog):
    machine(True)
    out, lines = warnings_of(caplog, make_cfg(*DDP_CPU))
    assert out.trainer.precision == "bf16-mixed" and lines == []
    machine(False)
    for overrides in ([], ["trainer=cpu"], [*DDP_CPU, "trainer.precision=32-true"]):
        out, lines = warnings_of(caplog, make_cfg(*overrides))
        assert lines == [], (overrides, lines)
        assert out == make_cfg(*overrides)


def test_half_precision_weights_on_cpu_are_kept_but_warned(machine, caplog):
    out, lines = warnings_of(caplog, make_cfg("trainer.precision=bf16-true"))
    assert out.trainer.precision == "bf16-true" and len(lines) == 1 and "32-true is usually faster" in lines[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.num_workers=4"], "data.num_workers=4 x 1 process(es) = 4 DataLoader workers on 2 CPU core(s)"),
        ([*DDP_CPU, "trainer.precision=32-true", "data.num_workers=2"], "set data.num_workers=1"),
        (
            ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"],
            "FSDP on a CPU",
        ),
        (
            [
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=4",
                "trainer.precision=32-true",
                "num_threads=null",
            ],
            "trainer.devices=4 CPU processes on 2 CPU core(s)",
        ),
        ([*DDP_CPU, "trainer.precision=32-true", "num_threads=2"], "num_threads=2 x 2 process(es) = 4 threads"),
    ],
)
def test_pathological_choices_warn(machine, caplog, overrides, expected):
    out, lines = warnings_of(caplog, make_cfg(*overrides))
    assert len(lines) == 1 and expected in lines[0], lines
    assert out == make_cfg(*overrides)  # warned, not changed


def test_gpu_without_bf16_warns(machine, caplog, monkeypatch):
    monkeypatch.setattr(config_checks, "_gpu_lacks_bf16", lambda: True)
    _, lines = warnings_of(caplog, make_cfg("trainer=gpu"))
    assert len(lines) == 1 and "set trainer.precision=16-mixed" in lines[0]


def test_bad_cpu_precision_value():
    with pytest.raises(UserError, match="cpu_precision='sometimes'"):
        check_training_config(make_cfg("cpu_precision=sometimes"))


def test_training_uses_the_corrected_precision(machine, caplog, tmp_path, repo_root):
    """Through train(): the run logs the warning and records (and trains with) 32-true."""
    from protein_performer.data.ingest import ingest
    from protein_performer.training.train import train

    shards = tmp_path / "shards"
    ingest(input=str(repo_root / "data" / "uniprot_sample.fasta.gz"), output_dir=str(shards), workers=1, progress=False)
    cfg = make_cfg(
        *tiny_overrides(
            "trainer.precision=bf16-mixed",
            f"data.root={shards}",
            f"run_dir={tmp_path / 'run'}",
            "logger=csv",
            "model.depth=1",
            "data.batch_size=16",  # the demo's
            "trainer.enable_model_summary=true",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=0",
            "validate=false",
            "test=false",
            "~callbacks.checkpoint",
        )
    )
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert any("trainer.precision=32-true is used" in r.getMessage() for r in caplog.records)
    hparams = yaml.safe_load((tmp_path / "run" / "csv" / "hparams.yaml").read_text())
    assert hparams["trainer"]["precision"] == "32-true"
    assert cfg.trainer.precision == "bf16-mixed"  # the caller's config is not modified
