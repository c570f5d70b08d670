"""Print the base image's pins (`name==version` of torch, transformers, sglang, triton) for pip's
`-c`, read with importlib.metadata; exit 1 unless sglang is the version the image is for.

    python tools/base_pins.py 0.5.23 > /etc/megatron-qae-base-pins.txt

Why not `pip freeze | grep`: SGLang's image installs sglang editable, which `pip freeze` prints
as `-e git+...#egg=sglang` (or `-e /path`), never `sglang==X`; the installed distribution's
metadata has the version whichever way it was installed. A package the image lacks (triton on
a CPU build) is left out; torch, transformers and sglang must be there. Runs with the standard
library only (the Dockerfile runs it before anything is installed).
"""

from __future__ import annotations

import sys
from importlib import metadata

PINNED = ("torch", "transformers", "sglang", "triton")
REQUIRED = ("torch", "transformers", "sglang")


def base_pins(expected_sglang: str) -> list[str]:
    """The pins, in PINNED order; raises SystemExit naming what is missing or wrong."""
    pins, missing = [], []
    for name in PINNED:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name in REQUIRED:
                missing.append(name)
    if missing:
        raise SystemExit(f"base image: {', '.join(missing)} not installed (importlib.metadata finds no "
                         "distribution); build FROM SGLang's own image, lmsysorg/sglang:v" + expected_sglang)
    found = metadata.version("sglang")
    if found != expected_sglang:
        raise SystemExit(f"base image has sglang {found}, this project pins sglang=={expected_sglang}; "
                         f"use FROM lmsysorg/sglang:v{expected_sglang}")
    return pins


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/base_pins.py SGLANG_VERSION")
    print("\n".join(base_pins(sys.argv[1])))
