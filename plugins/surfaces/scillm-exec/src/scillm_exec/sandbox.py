"""Enforce a run's sandbox, then exec the CLI: ``python -I sandbox.py --writable DIR ... -- ARGV...``.

The CLI starts in a mount namespace of its own where the whole file tree is read-only except the ``--writable``
directories (the run's own HOME and TMPDIR; ``cwd`` too for ``workspace-write``) and ``/proc`` (a CLI's own sandbox,
such as Codex's bubblewrap, writes its uid map there). Writes anywhere else fail with ``EROFS``, whatever the CLI
was told. As root the child also loses the capabilities that undo a mount namespace (``CAP_SYS_ADMIN`` to remount,
``CAP_DAC_READ_SEARCH`` for ``open_by_handle_at``, ``CAP_SYS_PTRACE``, raw devices, modules, ``mknod``); a user
namespace it makes itself gets copies of these mounts locked read-only. A non-root server gets the mount namespace
through a user namespace of its own, whose mounts the child cannot unlock either. This enforces the sandbox a CLI
was asked to keep; it is not a jail for hostile code running as root.

Standard library only (it runs with ``-I``), Linux only. If the sandbox cannot be set up the CLI never starts:
exit status 125 with the reason on stderr.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["SANDBOX_FAILED", "main"]

SANDBOX_FAILED = 125
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscall table)
PR_CAPBSET_DROP = 24
#: CAP_DAC_READ_SEARCH, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_BOOT, CAP_MKNOD
DROPPED_CAPS = (2, 16, 17, 19, 21, 22, 27)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter(writable: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid, root = os.getuid(), os.getgid(), os.geteuid() == 0
    _check(libc.unshare(CLONE_NEWNS if root else CLONE_NEWNS | CLONE_NEWUSER), "unshare")
    if not root:
        for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(line)
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    for path in writable:
        _check(libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")

    def setattr_(path: str, flags: int, attr: _MountAttr) -> None:
        _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                            ctypes.sizeof(attr)), f"mount_setattr {path}")

    setattr_("/", AT_RECURSIVE, _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0))
    for path in [*writable, "/proc"]:
        setattr_(path, 0, _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0))  # its own top only: mounts below stay read-only
    if root:
        for cap in DROPPED_CAPS:
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def main(args: list[str]) -> int:
    writable: list[str] = []
    while args and args[0] == "--writable":
        writable.append(os.path.realpath(args[1]))
        args = args[2:]
    if not args or args[0] != "--" or len(args) < 2:
        print("usage: sandbox.py [--writable DIR]... -- ARGV...", file=sys.stderr)
        return 2
    command = args[1:]
    try:
        enter(writable)
    except OSError as exc:
        print(f"scillm sandbox: cannot make the file tree read-only for this run ({exc.strerror}); the CLI was "
              f"not started", file=sys.stderr)
        return SANDBOX_FAILED
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"scillm sandbox: cannot start {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
