"""``import fastdfa`` works with no GPU, no Triton and no compiled extension (torchao's check)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
sys.modules["triton"] = None          # import triton raises ImportError
sys.modules["fastdfa._C"] = None      # no compiled extension
import torch
def _no_cuda(*a, **k):
    raise RuntimeError("CUDA must not be touched by import fastdfa")
torch.cuda.is_available = lambda: False
torch.cuda.init = _no_cuda
torch.cuda.current_device = _no_cuda
import fastdfa
from fastdfa.models import make_mlp
dfa = fastdfa.DFA(make_mlp(4, (3,), 2))
dfa(torch.randn(2, 4)).sum().backward()
from fastdfa.backends import backend_status
assert not backend_status("triton").available and "not installed" in backend_status("triton").reason
assert not backend_status("cuda").available
from fastdfa.info import info_text
print(info_text())
"""


def test_import_without_gpu_triton_or_extension():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    env.pop("FASTDFA_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "triton  not installed" in proc.stdout
    assert "torch   available" in proc.stdout


def test_import_does_not_import_triton():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    code = "import sys, fastdfa; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
