"""The emulated Ascend NPU used where no real ``torch_npu`` is installed (see ``torch_npu/``).

[Note: the emulated NPU stays out of the test process]
Importing the stand-in ``torch_npu`` renames torch's PrivateUse1 backend and registers an
accelerator, and libraries (transformers, accelerate, DeepSpeed, our launcher) switch to NPU
code paths as soon as ``torch_npu`` is importable. So the pytest process never imports it and
never has it on ``sys.path``: ``prepare()`` builds the extension in a subprocess, and only
the rank processes of the device tests call ``activate()``. A real torch_npu, when installed,
always wins: on an Ascend machine ``--device npu`` tests the hardware.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["ROOT", "activate", "device_count", "prepare", "real_torch_npu_installed"]

ROOT = Path(__file__).resolve().parent
_NO_COMPILER = 3  # the build subprocess's exit status when it cannot build here
_BUILD = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sfa_emulated_npu_build", {str(ROOT / "torch_npu" / "_extension.py")!r})
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
reason = ext.compiler_missing_reason()
if reason:
    print(reason)
    sys.exit({_NO_COMPILER})
ext.load()
"""
_prepared: dict[str, str | None] = {}


def real_torch_npu_installed() -> bool:
    """Whether ``import torch_npu`` would import a real torch_npu (not this stand-in)."""
    loaded = sys.modules.get("torch_npu")
    if loaded is not None:
        return not getattr(loaded, "EMULATED", False)
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        return importlib.util.find_spec("torch_npu") is not None
    finally:
        sys.path[:] = saved


def device_count() -> int:
    """Devices the emulated NPU shows (``EMULATED_NPU_DEVICE_COUNT``, default 2)."""
    return max(1, min(int(os.environ.get("EMULATED_NPU_DEVICE_COUNT", "2")), 16))


def prepare(timeout_s: float = 900.0) -> str | None:
    """Build the extension once (in a subprocess: this process stays untouched, see the Note).

    Returns:
        ``None`` when the emulated NPU can run (or a real torch_npu is installed), else why not.

    Raises:
        RuntimeError: a compiler exists but the build failed (its output is in the message).
    """
    if "reason" not in _prepared:
        if real_torch_npu_installed():
            _prepared["reason"] = None
        else:
            run = subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True, timeout=timeout_s)
            if run.returncode not in (0, _NO_COMPILER):
                raise RuntimeError(f"building the emulated NPU failed:\n{(run.stdout + run.stderr)[-4000:]}")
            _prepared["reason"] = run.stdout.strip() if run.returncode == _NO_COMPILER else None
    return _prepared["reason"]


def activate() -> None:
    """Make ``import torch_npu`` import the stand-in, unless a real torch_npu is installed.

    Only for processes that are the NPU's (device-test ranks, the device check): see the Note.
    """
    if not real_torch_npu_installed() and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
