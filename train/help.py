"""The command line around Hydra: `--help` that says what every key means, and the own-videos rule.

`--help` is written from the schema itself (configs/schema.py: each field's docstring), so it cannot
drift from the code; Hydra's own help stays at `--hydra-help`.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import textwrap
import typing
from pathlib import Path

from radial_lora.configs import schema

_SOURCE = re.compile(r"^\+{0,2}data\.(root|metadata|mix)=(.*)$")
_DATA_GROUP = re.compile(r"^\+{0,2}data=")


def own_videos_overrides(args: list[str]) -> tuple[list[str], str | None]:
    """(overrides, note): naming a dataset (`data.root=`, `data.metadata=`, `data.mix=`) means the
    user's videos, so the `videos` data group is used whatever else is composed (the demo group
    would otherwise generate synthetic clips). An explicit `data=GROUP` is kept as given."""
    named = [m.group(1) for a in args if (m := _SOURCE.match(a)) and m.group(2).strip() not in ("", "null")]
    if not named or any(_DATA_GROUP.match(a) for a in args):
        return list(args), None
    return ["data=videos", *args], f"data.{named[0]} names your videos: using data=videos (not the demo's clips)"


def field_docs() -> dict[tuple[str, str], str]:
    """{(class name, field name): docstring} of the schema's dataclasses, read from its source."""
    tree = ast.parse(Path(schema.__file__).read_text())
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for field, after in zip(body, body[1:]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[cls.name, field.target.id] = " ".join(after.value.value.split())
    return docs


def _shown(value) -> str:
    """A default as one would type it on the command line."""
    if isinstance(value, schema.Enum):
        return value.value
    if value is None:
        return "null"
    return str(value).replace(" ", "")


def _rows(cls, prefix: str, docs: dict) -> list[tuple[str, str]]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows += _rows(kind, f"{prefix}{f.name}.", docs)
            continue
        doc = docs.get((cls.__name__, f.name), "")
        if isinstance(kind, type) and issubclass(kind, schema.Enum) and not all(m.value in doc for m in kind):
            doc += " (one of " + ", ".join(m.value for m in kind) + ")"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and default != "???":
            doc += f" [default: {_shown(default)}]"
        rows.append((f"{prefix}{f.name}", doc.strip()))
    return rows


def print_help() -> None:
    """Usage, the config groups and their options, and every key with what it means."""
    groups = sorted(p for p in Path(schema.CONFIG_DIR).iterdir() if p.is_dir())
    print("usage: python -m train [+experiment=NAME] [GROUP=OPTION ...] [KEY=VALUE ...]   (or radial-lora-train)\n")
    print("With nothing named: the offline CPU demo. `--cfg job` prints the composed config without running;")
    print("`--hydra-help` shows Hydra's own flags. Naming data.root / data.metadata / data.mix uses data=videos.\n")
    print("Config groups (configs/):")
    for group in groups:
        options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        flag = "+experiment" if group.name == "experiment" else group.name
        print(f"  {flag + '=':13s} {options}")
    print("\nKeys, with the schema's defaults (configs/schema.py); the demo (train.yaml), the group options and")
    print("the experiments change some of them, and `--cfg job` prints what a command composes:")
    docs = field_docs()
    for key, doc in _rows(schema.Config, "", docs):
        lines = textwrap.wrap(doc, 64) or [""]
        print(f"  {key:36s} {lines[0]}".rstrip())
        for line in lines[1:]:
            print(f"  {'':36s} {line}")
