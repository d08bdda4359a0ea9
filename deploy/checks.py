"""Checks of what `./dev package` built, run by CI: each zip is for its function's
architecture, within its size budget, holds only what a function may ship; the
CloudFormation template Serverless generated has no error according to cfn-lint,
publishes each function's version only with the code of the zip checked here
(CodeSha256), and gives API Gateway one CORS entry per origin (https, not the
local machine, for any stage but dev).

    python -m deploy.checks [--stage dev] [--arch arm64] [--template <package dir>/<template>.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deploy.package import BUILD, read_service, sha256

# ELF e_machine values (the header's bytes 18-19, little-endian on both).
MACHINES = {"arm64": 183, "x86_64": 62}
MACHINE_NAMES = {183: "aarch64", 62: "x86_64", 3: "i386", 40: "arm"}
# Never in a function's zip: the project's tooling, tests and documents.
FORBIDDEN_TOP_LEVEL = {"tests", "devstack", "benchmarks", "deploy", "docs", "supabase", "node_modules",
                       ".venv"}
TEMPLATE_NAME = "cloudformation-template-update-stack.json"
STATE_NAME = "serverless-state.json"
DEV_STAGE = "dev"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "0.0.0.0"}  # noqa: S104 - names refused, not bound


def package_dir(stage: str) -> Path:
    """Where `./dev package --stage <stage>` leaves what `serverless deploy --package` uploads."""
    return BUILD / "serverless" / stage


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


def check_code_hashes(template: dict[str, Any], zips: dict[str, Path]) -> list[str]:
    """Each function's published version pins the sha256 of the zip built and checked here."""
    problems: list[str] = []
    resources = template.get("Resources", {})
    for name, path in zips.items():
        logical = name[0].upper() + name[1:] + "LambdaVersion"
        versions = [r for key, r in resources.items()
                    if key.startswith(logical) and r.get("Type") == "AWS::Lambda::Version"]
        want = base64.b64encode(bytes.fromhex(sha256(path))).decode() if path.exists() else None
        if [v["Properties"].get("CodeSha256") for v in versions] != [want]:
            problems.append(f"the template does not publish {name} with the code of {path.name}")
    return problems


_REF_STEP = re.compile(r'\[(?:"((?:[^"\\]|\\.)*)"|(\d+))\]')


def retrocycle(document: Any) -> Any:
    """Serverless's state file writes an object met twice once, then ``{"$ref": "$[...][...]"}``."""
    def follow(pointer: str) -> Any:
        found = document
        for key, index in _REF_STEP.findall(pointer):
            found = found[json.loads(f'"{key}"')] if not index else found[int(index)]
        return expand(found)

    def expand(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$ref"} and str(value["$ref"]).startswith("$["):
                return follow(value["$ref"])
            return {key: expand(item) for key, item in value.items()}
        if isinstance(value, list):
            return [expand(item) for item in value]
        return value

    return expand(document)


def check_state(template: dict[str, Any], state_path: Path) -> list[str]:
    """`serverless deploy --package` uploads the template kept in Serverless's state: the one checked."""
    if not state_path.exists():
        return [f"{state_path.name} is missing next to the template"]
    state = retrocycle(json.loads(state_path.read_text()))
    if state["service"]["provider"].get("compiledCloudFormationTemplate") != template:
        return [f"the template in {state_path.name} is not the one checked"]
    return []


def check_cors(template: dict[str, Any], stage: str) -> list[str]:
    """API Gateway compares a preflight's Origin with each entry: one origin per entry."""
    api = template.get("Resources", {}).get("HttpApi", {}).get("Properties", {})
    origins = api.get("CorsConfiguration", {}).get("AllowOrigins", [])
    problems = [] if origins else ["the HTTP API allows no CORS origin"]
    for origin in origins:
        url = urlsplit(origin)
        if "," in origin or url.path or url.query or not url.netloc:
            problems.append(f"CORS origin {origin!r} is not one origin")
        elif stage != DEV_STAGE and (url.scheme != "https" or url.hostname in LOCAL_HOSTS
                                     or (url.hostname or "").endswith(".localhost")):
            problems.append(f"CORS origin {origin} is not an https origin of your app (stage {stage})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.checks", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default=DEV_STAGE)
    parser.add_argument("--arch", choices=sorted(MACHINES), default=None)
    parser.add_argument("--build", type=Path, default=BUILD)
    parser.add_argument("--template", type=Path, default=None,
                        help=f"default: .build/serverless/<stage>/{TEMPLATE_NAME}")
    parser.add_argument("--no-template", action="store_true", help="check the zips only")
    args = parser.parse_args(argv)
    service = read_service()
    arch = args.arch or service.architecture
    template_path = args.template or package_dir(args.stage) / TEMPLATE_NAME
    problems: list[str] = []
    zips = {function.name: args.build / arch / f"{function.name}.zip" for function in service.functions}
    for function in service.functions:
        path = zips[function.name]
        if not path.exists():
            problems.append(f"{path} is missing: run ./dev package")
            continue
        problems += check_zip(path, arch, function.max_zip_mb)
        if not problems:
            print(f"  {function.name:<14} {path.stat().st_size / 1e6:5.1f} MB"
                  f" (budget {function.max_zip_mb:g} MB), native code for {arch} only")
    if not args.no_template:
        problems += check_template(template_path)
        if template_path.exists():
            template = json.loads(template_path.read_text())
            problems += check_code_hashes(template, zips) + check_cors(template, args.stage)
            problems += check_state(template, template_path.with_name(STATE_NAME))
            if not problems:
                cors = template["Resources"]["HttpApi"]["Properties"]["CorsConfiguration"]
                print(f"  template       each version pins its zip's sha256; "
                      f"CORS origins {', '.join(cors['AllowOrigins'])}")
    for problem in problems:
        print(f"package check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
