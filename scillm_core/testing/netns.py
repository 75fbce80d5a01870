"""A loopback-only network namespace for tests that run real agent CLIs (which try to reach the internet by
themselves): inside ``with loopback_only():`` the calling thread, and every thread and process it starts, sees
only ``lo``, so a stray connection fails at once instead of leaving the machine. Needs root (CAP_SYS_ADMIN).

A module-scoped fixture can hold one namespace for a whole module (one shared opencode server, one fake model);
the thread returns to its own namespace afterwards, so the rest of the suite is unaffected.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator

__all__ = ["links", "loopback_only"]

CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (the tests need root)")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the original network namespace failed: {os.strerror(err)}")
    finally:
        os.close(original)


def links() -> list[str]:
    """The network interfaces the calling thread sees (``["lo"]`` inside :func:`loopback_only`)."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines()]
