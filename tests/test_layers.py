"""The folders are layers, and imports run only downward (docs/layers.md has the picture):

    scripts (programs, benchmarks, lab tools)
    train (the entry point, the loop, the step, checkpoints, tracking)
    models   data   (siblings: neither imports the other)
    kernels
    configs (the typed schema, ConfigError, the Hydra tree)

Every `import radial_lora.X...` in a folder's modules, at the top or inside a function, must name
a folder its layer may use. A new upward import fails here with the file and line that made it."""

from __future__ import annotations

import ast

import pytest
from conftest import REPO

MAY_IMPORT = {
    "configs": set(),
    "kernels": {"configs"},
    "models": {"configs", "kernels"},
    "data": {"configs"},
    "train": {"configs", "kernels", "models", "data"},
    "scripts": {"configs", "kernels", "models", "data", "train"},
}


def our_imports(path):
    """(line, folder) of every import of a radial_lora folder in one file."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "radial_lora":  # from radial_lora import kernels
                names = [f"radial_lora.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "radial_lora" and len(parts) > 1:
                yield node.lineno, parts[1]


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_imports_run_only_downward(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    assert files or folder == "configs", f"no modules in {folder}/"
    upward = [
        f"{p.relative_to(REPO)}:{line} imports radial_lora.{target}"
        for p in files
        for line, target in our_imports(p)
        if target != folder and target not in MAY_IMPORT[folder]
    ]
    assert not upward, f"{folder}/ may import only {sorted(MAY_IMPORT[folder]) or 'nothing of ours'}:\n" + "\n".join(
        upward
    )


def test_every_folder_of_the_package_has_a_layer():
    import tomllib

    mapped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {name.split(".")[1] for name in mapped} == set(MAY_IMPORT)


def private_uses(path):
    """(line, name) of every private name (leading underscore) a file takes from our modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    ours = set()  # local names bound to our modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            ours |= {a.asname or a.name for a in node.names if a.name.startswith("radial_lora.") and a.asname}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("radial_lora"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
                ours.add(alias.asname or alias.name)  # a module or a name: attributes of either count
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ours
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_programs_use_only_public_names_of_the_libraries():
    """Lab tools, benchmarks and user commands reach the kernels and models through their public
    names (a kernel's tile through kernels' only_tile, not by patching a dict), so a library can
    change its insides without breaking a program silently."""
    files = sorted((REPO / "scripts").rglob("*.py"))
    private = [f"{p.relative_to(REPO)}:{line} uses {name}" for p in files for line, name in private_uses(p)]
    assert not private, "\n".join(private)
