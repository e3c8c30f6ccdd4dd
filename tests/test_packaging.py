"""One import name: the project installs `radial_lora` and nothing else, and shadows no package.

Hugging Face's `kernels` (a hard dependency of transformers >= 5.25) is installed beside the
project in the test environment, as on a user's machine: from the repository root, where our own
kernels/ folder lies, `import kernels` must still be theirs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

FOLDERS = ("train", "data", "models", "kernels", "scripts", "configs")


def python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_ecosystem_packages_import_from_the_repository_root():
    """transformers and diffusers load their own `kernels`, and ours import as radial_lora.kernels."""
    code = (
        "import importlib.util, pathlib\n"
        "import transformers.activations\n"
        "from diffusers import WanPipeline\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin)\n"
        "import radial_lora.kernels.dispatch as ours\n"
        "print(ours.__file__)\n"
    )
    proc = python(code, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, ours = proc.stdout.split()
    # Hugging Face's kernels, from site-packages (which may lie inside the checkout: CI's .venv).
    assert theirs != "None" and "site-packages" in Path(theirs).parts and Path(theirs).parent != REPO / "kernels"
    assert Path(ours) == REPO / "kernels" / "dispatch.py"


def test_top_level_folders_are_not_regular_packages():
    """An __init__.py in any of them would make it shadow an installed package of that name."""
    assert not [f for f in FOLDERS if (REPO / f / "__init__.py").exists()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """`pip wheel . --no-deps` of a copy of this checkout (setuptools writes build/ into the tree it
    builds; the venv's setuptools, so nothing is downloaded)."""
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree)
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("radial_lora-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_one_top_level_package_and_the_configs(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"radial_lora"}
    shipped = {n.removeprefix("radial_lora/configs/") for n in names if n.startswith("radial_lora/configs/")}
    in_checkout = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == in_checkout | {"schema.py"}
    # Every module of every package folder ships (a new sub-folder must be listed in pyproject.toml).
    for top_folder in ("train", "data", "models", "kernels", "scripts"):
        for module in (REPO / top_folder).rglob("*.py"):
            assert f"radial_lora/{module.relative_to(REPO).as_posix()}" in names, module
    assert "radial_lora/scripts/slurm/train.sbatch" in names


def test_installed_wheel_runs_from_anywhere(wheel, tmp_path):
    """The built package, first on sys.path, in a folder far from the checkout: its modules and the
    configs it carries are what the run uses."""
    site = tmp_path / "site"
    wheel.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys\n"
        "import radial_lora.train.__main__ as entry\n"
        "print(entry.__file__, entry.CONFIG_DIR, file=sys.stderr)\n"
        "sys.argv = ['radial-lora-train', '--cfg', 'job']\n"
        "entry.main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, configs = proc.stderr.split()[:2]
    assert Path(module).is_relative_to(site) and Path(configs).resolve() == (site / "radial_lora/configs").resolve()
    assert "name: tiny" in proc.stdout


@pytest.mark.slow
def test_demo_runs_from_the_root_and_the_console_script_from_elsewhere(tmp_path):
    """`python -m train` in the checkout and `radial-lora-train` in another folder: the same demo."""
    common = [
        f"cache_dir={tmp_path / 'cache'}",
        f"output_root={tmp_path / 'outputs'}",
        "train.steps=2",
        "train.checkpoint_every=0",
        "logger.mode=disabled",
        "data.num_workers=0",
    ]
    root = subprocess.run(
        [sys.executable, "-m", "train", "name=from_root", *common],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert root.returncode == 0, root.stderr[-3000:]
    assert root.stdout.strip().endswith(
        f"LoRA exported to {tmp_path / 'outputs/from_root/lora/pytorch_lora_weights.safetensors'}"
    )
    script = shutil.which("radial-lora-train", path=str(Path(sys.executable).parent))
    assert script, "the console script radial-lora-train is not installed"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = subprocess.run(
        [script, "name=from_script", *common], cwd=elsewhere, capture_output=True, text=True, timeout=600
    )
    assert other.returncode == 0, other.stderr[-3000:]
    assert (tmp_path / "outputs/from_script/lora/pytorch_lora_weights.safetensors").is_file()
