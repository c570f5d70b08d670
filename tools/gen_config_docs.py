"""Generate docs/config.md from the config dataclasses' field docstrings and their BOUNDS.

    python -m tools.gen_config_docs          # write docs/config.md
    python -m tools.gen_config_docs --check  # exit 1 when docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config.md"


def _class_node(cls: type) -> ast.ClassDef:
    """The AST of `cls` in its own source file (field docstrings are not kept at run time):
    each section is read where it is defined, whichever package that is."""
    tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)


def _fields(cls: ast.ClassDef) -> list[tuple[str, str, str, str]]:
    rows, body = [], cls.body
    for i, node in enumerate(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and "ClassVar" not in ast.unparse(node.annotation)):
            doc = ""
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                doc = " ".join(str(nxt.value.value).split())
            default = ast.unparse(node.value) if node.value is not None else ""
            rows.append((node.target.id, ast.unparse(node.annotation), default, doc))
    return rows


def render() -> str:
    from megatron_qae.config.loading import Config

    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    top = _class_node(Config)
    lines = ["# Configuration reference", "",
             "Generated from the dataclass docstrings by `python -m tools.gen_config_docs`; do not edit.",
             "Set fields in a YAML file (`--config`) or as dotted overrides (`algo.quantile_k=0.6`).", ""]
    for section, _, _, doc in _fields(top):
        lines += [f"## `{section}`", "", doc, "", "| field | type | default | range | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        lines += _rows(section, sections[section])
        lines.append("")
    return "\n".join(lines)


def _rows(prefix: str, cls: type) -> list[str]:
    """One table row per field of `cls`; a nested section (a dataclass field, e.g.
    algo.k_control) gets its own rows under its dotted name."""
    bounds, nested = getattr(cls, "BOUNDS", {}), {f.name: f.default_factory for f in dataclasses.fields(cls)
                                                  if dataclasses.is_dataclass(f.default_factory)}
    out = []
    for name, typ, default, fdoc in _fields(_class_node(cls)):
        if name in nested:
            out += _rows(f"{prefix}.{name}", nested[name])
            continue
        default = default.replace("field(default_factory=dict)", "{}").replace("|", "\\|")
        bound = bounds.get(name)
        span = bound.describe().replace("|", "\\|") if bound is not None else ""
        out.append(f"| `{prefix}.{name}` | `{typ.replace('|', chr(92) + '|')}` | `{default}` | {span} | {fdoc} |")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python -m tools.gen_config_docs")
            sys.exit(1)
        return
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
