"""`./dev package`: one zip per Lambda function, built for the architecture it runs on.

What goes in a function's zip, and nothing else:

* the handler module and the ``functions`` modules it imports (found by
  reading the imports, so a module nobody imports is never shipped);
* the third-party packages listed for it under ``custom.packages`` in
  ``serverless.yml``, with their dependencies, at the versions pinned in
  ``constraints.txt``, as manylinux wheels for the function's architecture
  (pip's ``--platform``/``--only-binary``: no Docker, no compiler, and never
  the build machine's own wheels);
* bytecode for Lambda's Python, compiled ahead (``unchecked-hash``: a zip's
  timestamps cannot invalidate it, and the read-only file system could not
  store a recompiled one), next to the sources for readable tracebacks.

boto3 is not shipped: the Lambda runtime provides it (only the SSM settings
path uses it).

The same commit builds byte-identical zips (same sha256), so a rebuild
publishes no new Lambda version or SnapStart snapshot: entries are sorted,
with fixed timestamps, normalised modes and one creator system; bytecode is
compiled serially, hash-based, and names its sources as Lambda sees them
(``/var/task/...``), never the temporary build directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import modulefinder
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVERLESS_YML = ROOT / "serverless.yml"
CONSTRAINTS = ROOT / "constraints.txt"
BUILD = ROOT / ".build"
# Lambda's names for the architectures -> manylinux platform tags pip accepts.
PLATFORMS = {
    "arm64": ("manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_34_aarch64"),
    "x86_64": ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64"),
}
# Installed by pip as scripts or caches, never imported by a function.
_DROP_DIRS = {"bin", "__pycache__"}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# Where Lambda unpacks a function's zip: the path compiled into its bytecode.
TASK_ROOT = "/var/task"


class PackageError(RuntimeError):
    """The package cannot be built (the message says what is missing)."""


@dataclass(frozen=True)
class Function:
    name: str            # the key under `functions:` in serverless.yml
    handler_module: str  # e.g. handlers.deduct
    requirements: tuple[str, ...]
    max_zip_mb: float    # the size budget CI holds the zip to


@dataclass(frozen=True)
class Service:
    runtime: str         # e.g. python3.12
    architecture: str    # arm64 | x86_64
    functions: tuple[Function, ...]

    @property
    def python_version(self) -> str:
        return self.runtime.removeprefix("python")


class _CloudFormationLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (``!Sub``, ``!Ref``, ...) as Serverless reads them."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = str(value).split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CloudFormationLoader.add_multi_constructor("!", _intrinsic)


def load_serverless_yml(path: Path = SERVERLESS_YML) -> dict[str, Any]:
    config: dict[str, Any] = yaml.load(path.read_text(), Loader=_CloudFormationLoader)  # noqa: S506
    return config


def read_service(path: Path = SERVERLESS_YML) -> Service:
    config = load_serverless_yml(path)
    provider = config["provider"]
    packages = config.get("custom", {}).get("packages", {})
    functions = []
    for name, spec in config["functions"].items():
        module = spec["handler"].rpartition(".")[0].replace("/", ".")
        if name not in packages:
            raise PackageError(f"serverless.yml: custom.packages.{name} lists no requirements")
        functions.append(Function(name, module, tuple(packages[name]["requirements"]),
                                  float(packages[name]["max_zip_mb"])))
    return Service(provider["runtime"], provider.get("architecture", "x86_64"), tuple(functions))


def find_python(version: str) -> str:
    """An interpreter of Lambda's Python version, to compile the bytecode with."""
    candidates = [shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates += sorted(str(p) for p in Path(pyenv_root).glob(f"versions/{version}.*/bin/python{version}"))
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if check.returncode == 0 and check.stdout.strip() == version:
            return candidate
    raise PackageError(f"python{version} is needed to compile the bytecode for Lambda's python{version} "
                       f"runtime; install it (e.g. `pyenv install {version}`) and put it on PATH")


def project_modules(handler_module: str) -> list[Path]:
    """The project's own files a handler imports (its package ``__init__`` files included)."""
    finder = modulefinder.ModuleFinder(path=[str(ROOT)])
    finder.run_script(str(ROOT / (handler_module.replace(".", "/") + ".py")))
    files = {ROOT / (handler_module.replace(".", "/") + ".py")}
    for name, module in finder.modules.items():
        path = getattr(module, "__file__", None)
        if name.split(".")[0] in {"functions", "handlers"} and path:
            files.add(Path(path).resolve())
    for package in ("functions", "handlers"):
        if any(f.parent == ROOT / package for f in files):
            files.add(ROOT / package / "__init__.py")
    return sorted(files)


def pip_install(requirements: list[str], architecture: str, python_version: str, target: Path, *,
                pinned: bool = True) -> None:
    """Wheels for Lambda's platform into ``target`` (at the versions of constraints.txt when ``pinned``)."""
    platforms = [arg for tag in PLATFORMS[architecture] for arg in ("--platform", tag)]
    pins = ["--constraint", str(CONSTRAINTS)] if pinned else []
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-compile", "--only-binary=:all:", *platforms, "--implementation", "cp",
               "--python-version", python_version, "--target", str(target), *pins, *requirements]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "is ignored" not in line]
        raise PackageError("pip could not install the wheels:\n" + "\n".join(errors[-15:]))


def stage(function: Function, service: Service, architecture: str, workdir: Path) -> Path:
    """A directory laid out as the function's /var/task."""
    root = workdir / function.name
    pip_install(list(function.requirements), architecture, service.python_version, root)
    for path in list(root.iterdir()):
        if path.is_dir() and path.name in _DROP_DIRS:
            shutil.rmtree(path)
    for source in project_modules(function.handler_module):
        destination = root / source.relative_to(ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    return root


def compile_bytecode(root: Path, python: str) -> None:
    """Hash-based bytecode for every module, as reproducible as the sources.

    ``-s``/``-p`` record each source as ``/var/task/<path>`` (the build
    directory is temporary, so it would differ between builds); one process
    compiling in compileall's sorted order leaves nothing to chance; ``-f``
    never keeps a stale file.
    """
    for cache in sorted(root.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    command = [python, "-m", "compileall", "-q", "-f", "-j", "1", "--invalidation-mode", "unchecked-hash",
               "-s", str(root), "-p", TASK_ROOT, str(root)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    # A few packages carry files for other Python versions that do not compile; those are never imported.
    if done.returncode not in (0, 1):
        raise PackageError(f"compileall failed: {done.stderr[-2000:]}")


def write_zip(root: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_ZIP_TIME)
            info.create_system = 3  # Unix, whatever machine builds it
            info.external_attr = (stat.S_IFREG | (0o755 if os.access(path, os.X_OK) else 0o644)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    tmp.replace(destination)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(architecture: str | None = None, out: Path = BUILD,
          only: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Build every function's zip (or those named in ``only``); returns {function: zip path}."""
    service = read_service()
    arch = architecture or service.architecture
    if arch not in PLATFORMS:
        raise PackageError(f"unknown architecture {arch!r} (use arm64 or x86_64)")
    python = find_python(service.python_version)
    built: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="credits-package-") as tmp:
        for function in service.functions:
            if only is not None and function.name not in only:
                continue
            print(f"  {function.name}: wheels for {arch} / python{service.python_version} ...",
                  file=sys.stderr, flush=True)
            root = stage(function, service, arch, Path(tmp))
            compile_bytecode(root, python)
            built[function.name] = out / arch / f"{function.name}.zip"
            write_zip(root, built[function.name])
    manifest = {name: {"zip": str(path.relative_to(out)), "bytes": path.stat().st_size,
                       "sha256": sha256(path)} for name, path in built.items()}
    (out / arch / "manifest.json").write_text(json.dumps(
        {"architecture": arch, "runtime": service.runtime, "functions": manifest}, indent=1) + "\n")
    return built


LOCK_HEADER = """\
# Every package a Lambda function may ship, pinned: the direct ones of
# requirements.txt and all they depend on. ./dev package installs with these
# as constraints, so a build today and one next month contain the same code.
# After changing requirements.txt, regenerate: ./dev package --lock
"""


def lock(architecture: str | None = None) -> None:
    """Resolve requirements.txt for Lambda's platform and pin the result in constraints.txt."""
    service = read_service()
    arch = architecture or service.architecture
    with tempfile.TemporaryDirectory(prefix="credits-lock-") as tmp:
        requirements = ["-r", str(ROOT / "requirements.txt")]
        pip_install(requirements, arch, service.python_version, Path(tmp), pinned=False)
        pins = []
        for info in Path(tmp).glob("*.dist-info"):
            name, _, version = info.name.removesuffix(".dist-info").rpartition("-")
            pins.append((name.lower().replace("_", "-"), version))
    CONSTRAINTS.write_text(LOCK_HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.package", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(PLATFORMS), default=None,
                        help="default: provider.architecture in serverless.yml")
    parser.add_argument("--out", type=Path, default=BUILD)
    parser.add_argument("--lock", action="store_true", help="re-pin constraints.txt from requirements.txt")
    args = parser.parse_args(argv)
    try:
        if args.lock:
            lock(args.arch)
            print(f"pinned {CONSTRAINTS.name}")
            return 0
        built = build(args.arch, args.out)
    except PackageError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    for name, path in built.items():
        print(f"  {name:<14} {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
              f"  {path.stat().st_size / 1e6:.1f} MB  sha256 {sha256(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
