"""The resumable-HDF5 protocol (protein_performer.outputs_h5) that export, embed and
predict_contacts share: refusal of an interrupted run's partial file, the settings check on
resume, the commit mark after the data, completion and the rename."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest

from protein_performer.errors import UserError
from protein_performer.outputs_h5 import SETTINGS_ATTR, ResumableH5, partial_path

SETTINGS = {"checkpoint_sha256": "abc", "input": "x.fasta", "crop": "skip"}


class OtherError(UserError):
    pass


def _interrupted(out, settings=SETTINGS, rows=3):
    """A partial file as a killed run leaves it: the header, ``rows`` rows, marks on the first two."""
    with ResumableH5(out, "test run", False, False).open(resumed=False) as h5:
        h5.attrs.update(settings)
        h5.create_dataset("x", data=np.arange(rows))
        ResumableH5.commit(h5, h5, "progress", 2)


def test_an_interrupted_run_is_refused_unless_resume_or_overwrite(tmp_path, caplog):
    out = tmp_path / "o.h5"
    assert partial_path(out) == tmp_path / "o.h5.partial"
    ResumableH5(out, "test run", False, False)  # nothing interrupted: nothing to refuse
    _interrupted(out)
    with pytest.raises(
        OtherError, match=r"o\.h5\.partial: an interrupted test run of .*o\.h5 is there; rerun with resume"
    ):
        ResumableH5(out, "test run", False, False, OtherError)
    with caplog.at_level(logging.WARNING, logger="protein_performer.outputs_h5"):
        run = ResumableH5(out, "test run", False, True)
    assert "is discarded" in caplog.text
    assert not run.resumes(SETTINGS, lambda h5: dict(h5.attrs))  # overwrite: starts afresh
    with run.open(resumed=False) as h5:
        assert list(h5) == [] and dict(h5.attrs) == {}


def test_resume_checks_the_settings_and_keeps_the_marked_records(tmp_path, caplog):
    out = tmp_path / "o.h5"
    _interrupted(out)
    read = lambda h5: {k: h5.attrs.get(k) for k in SETTINGS}  # noqa: E731
    run = ResumableH5(out, "test run", True, False)
    assert run.resumes(SETTINGS, read)
    with run.open(resumed=True) as h5:  # continued, not truncated: the marked rows are there
        assert int(h5.attrs["progress"]) == 2 and h5["x"][:2].tolist() == [0, 1]
    other = dict(SETTINGS, crop="center", input="y.fasta")
    with pytest.raises(UserError, match=r"ran with other settings \(crop, input differ\); rerun with the same"):
        run.resumes(other, read)
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # killed before the first flush
    with caplog.at_level(logging.WARNING, logger="protein_performer.outputs_h5"):
        assert not run.resumes(SETTINGS, read)
    assert "starting again" in caplog.text


def test_complete_and_publish(tmp_path):
    out = tmp_path / "sub" / "o.h5"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    run = ResumableH5(out, "test run", False, False)
    with run.open(resumed=False) as h5:
        h5.create_dataset("x", data=np.arange(4))
        run.complete(h5.attrs, {"b": 1, "a": [1, 2]}, "complete")
    assert out.read_bytes() == b"previous"  # replaced only by publish
    run.publish()
    assert not run.partial.exists()
    with h5py.File(out, "r") as h5:
        assert h5.attrs["complete"] and json.loads(h5.attrs[SETTINGS_ATTR]) == {"a": [1, 2], "b": 1}
        assert h5.attrs[SETTINGS_ATTR] == '{"a": [1, 2], "b": 1}'  # sorted keys: comparable as text
        assert h5["x"][()].tolist() == [0, 1, 2, 3]
