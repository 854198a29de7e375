"""Build (once per machine, cached and locked) and load the emulated NPU's C++ extension.

[Note: emulated NPU build cache]
The extension is compiled by ``torch.utils.cpp_extension.load`` with the system C++ compiler
against the installed torch's headers (about 2 minutes on 2 cores, ``MAX_JOBS=1``). The
build directory is keyed by the torch version and a hash of the source, under
``$SFA_EMULATED_NPU_CACHE`` or ``~/.cache/sharded_fused_adam/emulated_npu``, so a changed
source or torch rebuilds and anything else reuses the library. An ``fcntl`` lock around the
build lets ranks, pytest workers and CI jobs on one machine build it exactly once: the others
wait and then load the finished library. torch's own build lock (a file that must be
deleted by its owner) is cleared while we hold ours, because a build killed half-way would
otherwise leave every later one waiting forever.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["build_dir", "compiler_missing_reason", "load"]

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "emulated_npu.cpp"
_loaded: ModuleType | None = None


def _key() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return f"torch{torch.__version__}-{digest}".replace("+", "_")


def build_dir() -> Path:
    """Where this torch version's build of this source lives."""
    root = os.environ.get("SFA_EMULATED_NPU_CACHE") or Path.home() / ".cache" / "sharded_fused_adam" / "emulated_npu"
    return Path(root) / _key()


def _module_name() -> str:
    return "sfa_emulated_npu_" + _key().rsplit("-", 1)[1]


def compiler_missing_reason() -> str | None:
    """``None`` when the extension is built or can be built here, else why not."""
    if _built_library() is not None:
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH) to build the emulated NPU"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError as exc:
        return f"torch.utils.cpp_extension needs ninja to build the emulated NPU ({exc}); pip install ninja"
    return None


def _built_library() -> Path | None:
    found = sorted(build_dir().glob(_module_name() + "*.so"))
    return found[0] if found else None


def _import_library(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_module_name(), str(path))
    spec = importlib.util.spec_from_file_location(_module_name(), str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load(verbose: bool = False) -> ModuleType:
    """The extension module, building it first if this machine has no build of this source.

    Raises:
        RuntimeError: no compiler (see ``compiler_missing_reason``) or the build failed.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.flock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        library = _built_library()
        if library is None:
            reason = compiler_missing_reason()
            if reason:
                raise RuntimeError(reason)
            (directory / "lock").unlink(missing_ok=True)  # torch's baton, stale if a build was killed
            from torch.utils.cpp_extension import load as cpp_load

            os.environ.setdefault("MAX_JOBS", "1")
            started = time.perf_counter()
            _loaded = cpp_load(_module_name(), [str(SOURCE)], build_directory=str(directory),
                               extra_cflags=["-O2"], verbose=verbose)
            (directory / "build_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
            return _loaded
    _loaded = _import_library(library)
    return _loaded
