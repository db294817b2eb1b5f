"""A Binder-like install: a fresh virtual environment built from `binder/` alone.

repo2docker installs `binder/requirements.txt`, then runs `binder/postBuild` in a copy of the
repository. This test does the same in a new venv (no dev tools, nothing from `.venv`), then
imports twodwalk from outside the source tree and executes every notebook in that venv's own
kernel, so a dependency missing from `binder/` fails here rather than on Binder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_NOTEBOOKS = """
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

for path in sorted(Path(sys.argv[1]).glob("*.ipynb")):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute(
        cwd=str(path.parent)
    )
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, (path.name, errors)
    print("executed", path.name)
"""


def _copy_repository(target: Path) -> None:
    """What repo2docker sees: the repository's files, without local environments or caches."""
    shutil.copytree(
        ROOT,
        target,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "__pycache__",
            "*.egg-info",
            ".mypy_cache",
            ".ruff_cache",
            ".pytest_cache",
            ".hypothesis",
            "artifacts",
            "build",
            "dist",
        ),
    )


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_fresh_binder_environment_runs_every_notebook(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _copy_repository(repo)
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH")
    }
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    python = str(env_dir / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"], repo, env)
    _run(["bash", "binder/postBuild"], repo, env)
    where = _run([python, "-c", "import twodwalk; print(twodwalk.__file__)"], tmp_path, env)
    assert where.strip().startswith(str(env_dir)), "twodwalk comes from the Binder venv"
    out = _run([python, "-c", RUN_NOTEBOOKS, str(repo / "notebooks")], tmp_path, env)
    executed = {line.split()[1] for line in out.splitlines() if line.startswith("executed ")}
    assert executed == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
