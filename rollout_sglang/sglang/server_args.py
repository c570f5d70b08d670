"""`engine.sglang_args` checked against SGLang's own argument parser, in the engines' python.

What it does: asks the interpreter that will run `sglang.launch_server` (`engine.sglang_python`,
else this one) once per process for the argument names of SGLang's `ServerArgs.add_cli_args`
parser, and refuses a key of `engine.sglang_args` that is not one of them, naming the closest
names. Whether sglang is importable in the trainer's python does not matter: the question goes
to the python that has it (SGLang often lives in its own venv). A python that cannot import
sglang is a config error naming it; a question that outlasts its deadline is a timeout.
What it does not: check values (SGLang's parser does, at the server's start) or start a server.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import subprocess
import sys
from typing import Any

_ASK = (
    "import argparse, json\n"
    "from sglang.srt.server_args import ServerArgs\n"
    "parser = argparse.ArgumentParser()\n"
    "ServerArgs.add_cli_args(parser)\n"
    "print(json.dumps(sorted({o[2:].replace('-', '_') for a in parser._actions\n"
    "                         for o in a.option_strings if o.startswith('--')})))\n"
)

ASK_TIMEOUT_S = 300.0
"""Deadline of the question: importing sglang.srt.server_args takes 10-40 s on a loaded CPU."""


@functools.cache
def sglang_arg_names(python: str) -> frozenset[str]:
    """The `--` argument names (underscored) of `sglang.launch_server` as `python` parses them
    (the parser needs no GPU and no kernel package: the same names on CPU and GPU)."""
    try:
        proc = subprocess.run([python, "-c", _ASK], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=ASK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"asking {python} for sglang.launch_server's arguments timed out after "
                           f"{ASK_TIMEOUT_S:g} s (importing sglang.srt.server_args)") from None
    except OSError as exc:
        raise ValueError(f"engine.sglang_python={python!r} cannot run ({exc}); give the absolute path of "
                         "the python that has sglang (`make test` builds .venv-sglang/bin/python)") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"engine.backend=sglang: {python} cannot import sglang.srt.server_args ({last}); set "
                         "engine.sglang_python to the python that has sglang (`make test` builds "
                         ".venv-sglang/bin/python)")
    return frozenset(json.loads(proc.stdout.strip().splitlines()[-1]))


def validate_server_args(extra_args: dict[str, Any], python: str | None = None) -> None:
    """Raise ValueError for a key of `engine.sglang_args` that `sglang.launch_server` run by
    `python` (default: this interpreter) does not take. No keys, no question."""
    if not extra_args:
        return
    known = sglang_arg_names(python or sys.executable)
    for key in extra_args:
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise ValueError(f"engine.sglang_args.{key}: not an argument of sglang.launch_server "
                             f"(SGLang's ServerArgs); did you mean {close}? See "
                             "`python -m sglang.launch_server --help`")
