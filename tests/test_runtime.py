import subprocess
import sys


def test_keep_freed_memory_is_applied_and_idempotent():
    code = (
        "from protein_performer.runtime import keep_freed_memory as k; import torch;"
        "a = k(); b = k(); x = torch.ones(1 << 24); del x; y = torch.zeros(1 << 24);"
        "assert float(y.sum()) == 0.0; print(a, b)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if sys.platform.startswith("linux"):
        assert out == ["True", "True"]


def test_keep_freed_memory_can_be_disabled():
    code = "from protein_performer.runtime import keep_freed_memory as k; print(k())"
    env = {"PROTEIN_PERFORMER_KEEP_MEMORY": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"
