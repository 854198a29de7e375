"""The emulated Ascend NPU used where no real ``torch_npu`` is installed (see ``torch_npu/``).

``activate()`` puts the stand-in ``torch_npu`` package on ``sys.path`` (building its C++
extension once per machine, [Note: emulated NPU build cache]) unless a real torch_npu is
installed, which always wins: on an Ascend machine ``--device npu`` tests the hardware.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["ROOT", "activate", "real_torch_npu_installed"]

ROOT = Path(__file__).resolve().parent


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


def activate() -> str | None:
    """Make ``import torch_npu`` work here; ``None`` on success, else why the NPU cannot run.

    With a real torch_npu installed nothing changes (importing it may still fail: the caller
    reports that). Otherwise the stand-in goes on ``sys.path`` and its extension is built or
    loaded now, so that ranks started afterwards only load it.
    """
    if real_torch_npu_installed():
        return None
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from torch_npu import _extension  # the stand-in's; builds nothing on import

    reason = _extension.compiler_missing_reason()
    if reason is None:
        _extension.load()
    return reason
