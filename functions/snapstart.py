"""SnapStart: what must happen again when Lambda resumes a function from a snapshot.

With SnapStart, the cold start (module import: settings read, clients built)
runs once per published version, and every new execution environment resumes
from that memory. Anything read at import is therefore as old as the deploy:
the after-restore hook reads the secrets again.

``snapshot_restore_py`` ships with Lambda's Python runtime only; elsewhere (the
local stack, the tests) there are no snapshots and nothing is registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from functions.observability import logger
from functions.settings import LiveSettings


def after_restore(hook: Callable[[], object]) -> bool:
    """Run ``hook`` each time Lambda restores this function from a snapshot (never raises from
    the hook: a failed restore would fail the invocation that caused it). True when registered."""
    try:
        runtime = importlib.import_module("snapshot_restore_py")
    except ImportError:
        return False

    def guarded() -> None:
        try:
            hook()
        except Exception as exc:  # the hook must not fail the restore; the next request retries
            logger.error("after-restore hook failed", extra={"error_type": type(exc).__name__})

    runtime.register_after_restore(guarded)
    return True


def refresh_after_restore(settings: LiveSettings[Any]) -> bool:
    """Read ``settings`` again after each restore."""
    return after_restore(settings.after_restore)
