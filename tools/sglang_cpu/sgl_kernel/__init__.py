"""Stand-in for SGLang's `sgl_kernel` package so `sglang.launch_server --device cpu` can start
on a machine without CUDA.

What it does: lets every `import sgl_kernel`, `import sgl_kernel.<submodule>` and
`from sgl_kernel[.<submodule>] import <name>` succeed; every name it hands out raises
`RuntimeError` (naming the kernel) the moment it is called or used as a value. The PyPI
`sgl-kernel` / `sglang-kernel` wheels are CUDA builds that fail to import without libcuda,
while SGLang's CPU backend (SGLANG_USE_CPU_ENGINE=1) serves through torch-native paths and
calls none of these kernels; if it ever does, the call fails loudly instead of computing
something else. What it does not: implement any kernel. Only our engine launcher puts this
directory on the server's PYTHONPATH, and only when the engine is asked to serve on CPU
(`engine.sglang_args.device=cpu`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+cpu-stand-in"


class MissingKernel:
    """A name imported from the stand-in; calling it (or computing with it) raises."""

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def _fail(self, *_args, **_kwargs):
        raise RuntimeError(
            f"{self._qualname} was called, but sgl_kernel is the CPU stand-in from "
            "tools/sglang_cpu (no CUDA kernels here); this SGLang code path needs a GPU build "
            "of sgl-kernel")

    __call__ = _fail
    __int__ = __float__ = __index__ = __len__ = __iter__ = _fail

    def __getattr__(self, name: str) -> "MissingKernel":
        if name.startswith("__"):
            raise AttributeError(name)
        return MissingKernel(f"{self._qualname}.{name}")

    def __repr__(self) -> str:
        return f"<sgl_kernel stand-in {self._qualname}>"


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> MissingKernel:
        if name.startswith("__"):
            raise AttributeError(name)
        return MissingKernel(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves every `sgl_kernel.<x>` submodule as another stand-in module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        return None


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StandInModule
