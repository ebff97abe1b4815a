"""Run a command under the seccomp parts of a systemd unit, without systemd.

The build machine has systemd's tools but no running systemd, so ``systemd-run -p
SystemCallFilter=...`` cannot start anything.  This launcher loads the same kind of filter with
libseccomp (which systemd itself uses), then execs the command, so tests can run trainingd's real
code paths under a unit's allow list:

- ``--allow NAME`` (repeated): the system calls the unit's ``SystemCallFilter=`` lines leave
  allowed (the test expands the groups with ``systemd-analyze syscall-filter``); every other call
  fails with EPERM, as with ``SystemCallErrorNumber=EPERM``;
- ``--unix-only``: ``socket()`` only for AF_UNIX (``RestrictAddressFamilies=AF_UNIX``);
- ``--mdwe``: no writable+executable mapping and no ``mprotect(PROT_EXEC)``, the rules systemd
  installs for ``MemoryDenyWriteExecute=yes``.

Usage: ``python seccomp_jail.py [--unix-only] [--mdwe] --allow read --allow ... -- CMD ARGS``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_BASE = 0x00050000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000


class ArgCmp(ctypes.Structure):
    """``struct scmp_arg_cmp``."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def _allow(lib: ctypes.CDLL, ctx: int, name: str, *conds: ArgCmp) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr == -1:  # __NR_SCMP_ERROR: not a call libseccomp knows on any arch
        return
    arr = (ArgCmp * max(1, len(conds)))(*conds)
    rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, len(conds), arr)
    if rc != 0:
        raise SystemExit(f"seccomp_rule_add({name}) failed: {rc}")


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    opts, cmd = argv[:sep], argv[sep + 1:]
    names = {opts[i + 1] for i, o in enumerate(opts) if o == "--allow"}
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO_BASE | 1)  # default: EPERM
    if not ctx:
        raise SystemExit("seccomp_init failed")
    conditional: dict[str, list[tuple[ArgCmp, ...]]] = {}
    if "--unix-only" in opts and "socket" in names:
        conditional["socket"] = [(ArgCmp(0, SCMP_CMP_EQ, socket.AF_UNIX, 0),)]
    if "--mdwe" in opts:
        no_exec = ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, 0)
        for call in ("mmap", "mmap2"):
            if call in names:  # W or X, never both
                conditional[call] = [(no_exec,), (ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_WRITE, 0),)]
        for call in ("mprotect", "pkey_mprotect"):
            if call in names:
                conditional[call] = [(no_exec,)]
        if "shmat" in names:
            conditional["shmat"] = [(ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, 0),)]
    for name in sorted(names):
        for conds in conditional.get(name, [()]):
            _allow(lib, ctx, name, *conds)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SystemExit("prctl(NO_NEW_PRIVS) failed")
    rc = lib.seccomp_load(ctx)
    if rc != 0:
        raise SystemExit(f"seccomp_load failed: {rc}")
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
