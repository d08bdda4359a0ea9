"""Checks of what `./dev package` built, run by CI: each zip is for its function's
architecture, within its size budget, holds only what a function may ship, and the
CloudFormation template Serverless generated has no error according to cfn-lint.

    python -m deploy.checks [--arch arm64] [--template .serverless/cloudformation-template-update-stack.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from deploy.package import BUILD, ROOT, read_service

# ELF e_machine values (the header's bytes 18-19, little-endian on both).
MACHINES = {"arm64": 183, "x86_64": 62}
MACHINE_NAMES = {183: "aarch64", 62: "x86_64", 3: "i386", 40: "arm"}
# Never in a function's zip: the project's tooling, tests and documents.
FORBIDDEN_TOP_LEVEL = {"tests", "devstack", "benchmarks", "deploy", "docs", "supabase", "node_modules",
                       ".venv"}
TEMPLATE = ROOT / ".serverless" / "cloudformation-template-update-stack.json"


def elf_machine(header: bytes) -> int | None:
    """The e_machine of an ELF file's first bytes, or None if it is not ELF."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def native_libraries(archive: zipfile.ZipFile) -> dict[str, int]:
    """Every ELF file in the zip (shared libraries, executables) and its machine."""
    found: dict[str, int] = {}
    for name in archive.namelist():
        with archive.open(name) as member:
            machine = elf_machine(member.read(20))
        if machine is not None:
            found[name] = machine
    return found


def check_zip(path: Path, architecture: str, max_zip_mb: float) -> list[str]:
    """What is wrong with one function's zip (empty: nothing)."""
    problems: list[str] = []
    size_mb = path.stat().st_size / 1e6
    if size_mb > max_zip_mb:
        problems.append(f"{path.name}: {size_mb:.1f} MB is over its budget of {max_zip_mb:g} MB")
    with zipfile.ZipFile(path) as archive:
        wanted = MACHINES[architecture]
        for name, machine in sorted(native_libraries(archive).items()):
            if machine != wanted:
                problems.append(f"{path.name}: {name} is built for {MACHINE_NAMES.get(machine, machine)}, "
                                f"not {architecture}")
        top = {name.split("/", 1)[0] for name in archive.namelist()}
        for name in sorted(top & FORBIDDEN_TOP_LEVEL):
            problems.append(f"{path.name}: ships {name}/, which no function imports")
    return problems


def check_template(template: Path) -> list[str]:
    """cfn-lint's errors in the generated template (warnings are printed, not failures)."""
    if not template.exists():
        return [f"{template} does not exist: run `serverless package` first"]
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    done = subprocess.run([str(cfn_lint), str(template)], capture_output=True, text=True, check=False)
    # cfn-lint's exit code is a bit mask: 2 = errors, 4 = warnings, 8 = informational, 1 = it failed.
    if done.returncode & 0b11:
        print(done.stdout.rstrip(), file=sys.stderr)
        return [f"cfn-lint found errors in {template.name} (exit {done.returncode}){done.stderr[-500:]}"]
    codes = sorted({line.split()[0] for line in done.stdout.splitlines() if line[:1] in "WI" and " " in line})
    warnings = f"; warnings {', '.join(codes)}" if codes else ""
    print(f"  cfn-lint       no errors in {template.name}{warnings}")
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.checks", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(MACHINES), default=None)
    parser.add_argument("--build", type=Path, default=BUILD)
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--no-template", action="store_true", help="check the zips only")
    args = parser.parse_args(argv)
    service = read_service()
    arch = args.arch or service.architecture
    problems: list[str] = []
    for function in service.functions:
        path = args.build / arch / f"{function.name}.zip"
        if not path.exists():
            problems.append(f"{path} is missing: run ./dev package")
            continue
        problems += check_zip(path, arch, function.max_zip_mb)
        if not problems:
            print(f"  {function.name:<14} {path.stat().st_size / 1e6:5.1f} MB"
                  f" (budget {function.max_zip_mb:g} MB), native code for {arch} only")
    if not args.no_template:
        problems += check_template(args.template)
    for problem in problems:
        print(f"package check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
