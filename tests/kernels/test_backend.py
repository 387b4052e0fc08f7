"""Backend choice: auto = Triton on CUDA / PyTorch elsewhere, overridable by argument or env."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from opengem.kernels._backend import ENV_VAR, resolve


def test_auto_picks_by_device_and_env(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve("auto", cpu) == "pytorch"
    assert resolve("pytorch", cpu) == "pytorch"
    monkeypatch.setenv(ENV_VAR, "pytorch")
    assert resolve("auto", cpu) == "pytorch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve("auto", cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve("cuda", cpu)


def test_import_needs_no_triton_and_triton_on_cpu_is_refused():
    """A fresh interpreter without TRITON_INTERPRET: importing opengem.kernels and running
    the CPU default imports no triton, and forcing Triton on CPU tensors is a clear error."""
    code = (
        "import sys, torch\n"
        "from opengem.kernels import fm_interaction\n"
        "fm_interaction(torch.randn(2, 3, 4), torch.randn(3, 2))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
        "try:\n"
        "    fm_interaction(torch.randn(2, 3, 4), torch.randn(3, 2), backend='triton')\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: the triton backend needs CUDA tensors" in out.stdout
