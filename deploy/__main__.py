"""`./dev package`: build the zips, let Serverless turn them into a CloudFormation
template (offline, no AWS credentials), and check both.

    ./dev package [--stage dev] [--region us-east-1] [--param="name=value" ...]

Other options (``--param=...``) are passed on to ``serverless package``. The
package (template and Serverless's state) goes to ``.build/serverless/<stage>/``;
then `npx serverless deploy --stage <stage> --package .build/serverless/<stage>`
(with AWS credentials) uploads exactly what was built and checked here: that
template, with its CORS origins and params, and the zips whose sha256 it pins.
Nothing is packaged again from the deploying shell's environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from deploy import checks, package

SERVERLESS_ENV = {"SLS_TELEMETRY_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off"}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def npm_ci() -> None:
    """Serverless and its plugin as pinned in package-lock.json (again only when the lock changed)."""
    if not shutil.which("npm"):
        raise package.PackageError("Node.js 18+ with npm is needed to run Serverless (`serverless package`)")
    installed = package.ROOT / "node_modules" / ".package-lock.json"
    lock = package.ROOT / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    say("Installing Serverless 3 as pinned in package-lock.json (npm ci) ...")
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=package.ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise package.PackageError(f"npm ci failed:\n{done.stderr[-2000:]}")


def serverless_package(stage: str, region: str, extra: list[str], package_dir: Path) -> None:
    say(f"Generating the CloudFormation template (serverless package --stage {stage}) ...")
    env = {**os.environ, **SERVERLESS_ENV}
    command = ["npx", "--no-install", "serverless", "package", "--stage", stage, "--region", region,
               "--package", str(package_dir.relative_to(package.ROOT)), *extra]
    done = subprocess.run(command, cwd=package.ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise package.PackageError(f"serverless package failed:\n{(done.stdout + done.stderr)[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev package", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="dev")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--lock", action="store_true", help="re-pin constraints.txt from requirements.txt")
    args, extra = parser.parse_known_args(argv)
    if any(not option.startswith("--param") for option in extra):
        parser.error(f"unknown options {' '.join(extra)} (only --param=... is passed on to serverless)")
    if args.lock:
        return package.main(["--lock"])
    # Serverless refuses it too (deploy/cors_origins.js); saying so first saves the build.
    if args.stage != checks.DEV_STAGE and not os.environ.get("CREDITS_CORS_ALLOW_ORIGINS", "").strip():
        say(f"package: set CREDITS_CORS_ALLOW_ORIGINS to your app's https origin(s), comma-separated, before "
            f"packaging stage {args.stage} (e.g. https://app.example.com); only dev defaults to "
            "http://localhost:3000")
        return 2
    package_dir = checks.package_dir(args.stage)
    try:
        say("Building one zip per function ...")
        built = package.build()
        npm_ci()
        serverless_package(args.stage, args.region, extra, package_dir)
    except package.PackageError as exc:
        say(f"package: {exc}")
        return 1
    say("Checking the package ...")
    status = checks.main(["--stage", args.stage])
    if status == 0:
        for name, path in built.items():
            print(f"  {name:<14} {path.relative_to(package.ROOT)}  sha256 {package.sha256(path)}")
        print(f"Ready: npx serverless deploy --stage {args.stage} --region {args.region} "
              f"--package {package_dir.relative_to(package.ROOT)}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
