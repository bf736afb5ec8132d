"""The sandbox model code runs in: Triton and its backend processes, as another identity that
can reach nothing of the agent's.

Model owners are strangers, and their code (a Python backend's `model.py`, a backend library
shipped with a model) runs inside Triton on a provider's machine. It must learn nothing of the
node: not the agent's keys, its state, the plaintext of encrypted tasks, the agent's
environment or memory, nor reach the registry, etcd or anything else on the network. The agent
starts Triton through this module's exec wrapper (`python -m shard_node.sandbox POLICY --
tritonserver ...`), which, in a fresh single-threaded process, before it execs Triton:

1. moves into a user namespace of its own, where it is `nobody` and holds no capability over
   anything outside it (if the machine forbids that, it drops every capability instead);
2. sets no_new_privs, so nothing it execs gains privileges (setuid binaries included);
3. restricts itself with Landlock (Linux 5.13+; TCP rules need 6.7+, scopes 6.12+), which every
   process it starts inherits and cannot undo: files only beneath the paths the policy names
   (Triton, the interpreter, system libraries, the model repository, read-only; a private
   temporary directory and /dev/shm writable), TCP bind only on Triton's own ports and TCP
   connect nowhere, no signals and no abstract unix sockets outside the sandbox;
4. execs Triton with a minimal environment (none of the agent's variables, which carry its
   join token and Triton's control key).

The agent makes itself non-dumpable (`protect_agent`), so its /proc entries (environ, mem, fd)
need CAP_SYS_PTRACE, which nothing in the sandbox has. Landlock is a Linux security module that
any process may use on itself, so this works without root, in containers, and on GPU hosts
alike. `python -m shard_node.sandbox --probe` prints what this machine supports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

# Syscall numbers are the same on x86_64 and aarch64 for these (asm-generic, 5.13+).
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP = 38, 4, 24
# unshare(2) and prctl(2) by number too (x86_64, else aarch64).
_UNSHARE = 272 if os.uname().machine == "x86_64" else 97
_PRCTL = 157 if os.uname().machine == "x86_64" else 167
_CLONE_NEWUSER, _CLONE_NEWNS = 0x10000000, 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 1, 2, 4, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 1 << 12, 1 << 14, 1 << 18
NOBODY = 65534

# Filesystem rights, by the Landlock ABI that introduced them.
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REMOVE_DIR, _REMOVE_FILE, _MAKE_DIR, _MAKE_REG = 1 << 4, 1 << 5, 1 << 7, 1 << 8
_MAKE_SYM, _REFER, _TRUNCATE, _IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
# Every right each ABI knows (ABI 1: bits 0-12; 2 adds REFER, 3 TRUNCATE, 5 IOCTL_DEV).
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_BIND_TCP, _CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

_READ = _READ_FILE | _READ_DIR
_READ_EXECUTE = _READ | _EXECUTE
_WRITE = (
    _READ
    | _WRITE_FILE
    | _REMOVE_DIR
    | _REMOVE_FILE
    | _MAKE_DIR
    | _MAKE_REG
    | _MAKE_SYM
    | _REFER
    | _TRUNCATE
)
_DEVICE = _READ | _WRITE_FILE | _IOCTL_DEV
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV

# System files a dynamically linked program and Python read, and nothing else of /etc.
_ETC = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/os-release",
)
_SYSTEM = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/opt/conda")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/nvidia*")
# What the sandbox passes on of the agent's environment: which GPUs, nothing secret.
PASSED_ENVIRONMENT = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
)


class SandboxError(RuntimeError):
    """The machine cannot give model code the isolation the policy asks for."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _NetPortAttr(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _syscall(number: int, *args: object) -> int:
    result: int = _libc.syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def landlock_abi() -> int:
    """The Landlock ABI this kernel offers; 0 when it has none (or it is disabled)."""
    try:
        return _syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    except OSError:
        return 0


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What the sandboxed program may touch."""

    read_execute: Sequence[str] = ()  # programs and libraries
    read: Sequence[str] = ()  # data: the model repository
    write: Sequence[str] = ()  # its temporary directory, /dev/shm
    devices: Sequence[str] = ()  # read, write and ioctl (GPUs)
    bind_ports: Sequence[int] = ()  # TCP ports it may listen on; it may connect to none
    environment: dict[str, str] = field(default_factory=dict)
    require_network_rules: bool = True  # refuse to run where TCP cannot be restricted

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls(**json.loads(text))


def triton_policy(
    *,
    programs: Iterable[str],
    repository: str,
    temporary: str,
    ports: Iterable[int],
    path: str,
    library_path: str,
    require_network_rules: bool = True,
) -> Policy:
    """The policy of a Triton serving `repository`, with its programs (Triton, its backends,
    the interpreter of the Python backend) and its ports."""
    environment = {
        "PATH": path,
        "LD_LIBRARY_PATH": library_path,
        "HOME": temporary,
        "TMPDIR": temporary,
        "LANG": "C.UTF-8",
    }
    environment |= {k: os.environ[k] for k in PASSED_ENVIRONMENT if k in os.environ}
    return Policy(
        read_execute=[*programs, *_SYSTEM],
        read=[repository, *_ETC, "/proc", "/sys"],
        write=[temporary, "/tmp", "/dev/shm"],
        devices=list(_DEVICES),
        bind_ports=list(ports),
        environment=environment,
        require_network_rules=require_network_rules,
    )


def _existing(patterns: Iterable[str]) -> list[str]:
    return [p for pattern in patterns for p in sorted(glob.glob(pattern))]


def _allow(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not os.path.isdir(path):
            access &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        _syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    finally:
        os.close(fd)


def restrict(policy: Policy) -> list[str]:
    """Restrict this process (and all it will start) to `policy`; what was enforced."""
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError("this kernel has no Landlock (Linux 5.13+ with landlock in lsm=)")
    if policy.require_network_rules and abi < 4:
        raise SandboxError(
            f"this kernel's Landlock (ABI {abi}) cannot restrict TCP; that needs Linux 6.7+"
        )
    fs = _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= abi)]
    net = _BIND_TCP | _CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(handled_access_fs=fs, handled_access_net=net, scoped=scoped)
    ruleset = _syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    try:
        for paths, access in (
            (policy.read_execute, _READ_EXECUTE),
            (policy.read, _READ),
            (policy.write, _WRITE),
            (policy.devices, _DEVICE),
        ):
            for path in _existing(paths):
                _allow(ruleset, path, access & fs)
        if net:
            for port in policy.bind_ports:
                rule = _NetPortAttr(allowed_access=_BIND_TCP, port=port)
                _syscall(_ADD_RULE, ruleset, _RULE_NET_PORT, ctypes.byref(rule), 0)
        _syscall(_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return [f"landlock-abi-{abi}", "fs", *(["tcp"] if net else []), *(["scoped"] if scoped else [])]


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str) -> None:
    if _libc.mount(
        source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
        data.encode() if data else None,
    ) != 0:  # fmt: skip
        code = ctypes.get_errno()
        raise OSError(code, f"mount {target}: {os.strerror(code)}")


def _private_tmp(policy: Policy) -> None:
    """Put an empty tmpfs over /tmp, and bind into it again the paths under /tmp the policy
    names (a state directory there, say), read-only unless the policy lets it write there;
    nothing else of the machine's /tmp stays visible."""
    writable = {os.path.realpath(path) for path in _existing(policy.write)}
    kept = {}
    for path in _existing([*policy.read_execute, *policy.read, *policy.write, *policy.devices]):
        real = os.path.realpath(path)
        if real.startswith("/tmp/"):
            kept[real] = os.open(real, os.O_PATH | os.O_CLOEXEC)
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    for real, fd in sorted(kept.items()):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(real, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(real), exist_ok=True)
            os.close(os.open(real, os.O_CREAT | os.O_WRONLY, 0o600))
        _mount(f"/proc/self/fd/{fd}", real, None, _MS_BIND | _MS_REC, "")
        os.close(fd)
        if real not in writable:
            _mount(None, real, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, "")


def _new_identity(policy: Policy) -> str:
    """Become `nobody` in a user namespace of its own, holding no capability outside it, with a
    mount namespace of its own; where user namespaces are forbidden and the agent is root, keep
    the uid but give up every capability. Either way /tmp becomes a private, empty tmpfs (the
    Python backend puts its environments in /tmp, whatever TMPDIR says)."""
    uid, gid = os.getuid(), os.getgid()
    try:
        _syscall(_UNSHARE, _CLONE_NEWUSER | _CLONE_NEWNS)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EINVAL, errno.ENOSPC, errno.EUSERS):
            raise
        if os.geteuid() != 0:
            raise SandboxError(
                "this machine forbids unprivileged user namespaces; run the agent as root or "
                "allow them (kernel.unprivileged_userns_clone, AppArmor's restriction)"
            ) from error
        _syscall(_UNSHARE, _CLONE_NEWNS)
        identity = "no-capabilities"
    else:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{NOBODY} {uid} 1")
        _write("/proc/self/gid_map", f"{NOBODY} {gid} 1")
        identity = "user-namespace"
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, "")
    _private_tmp(policy)
    if identity == "no-capabilities":
        for capability in range(64):  # what it execs then has none either
            try:
                _syscall(_PRCTL, _PR_CAPBSET_DROP, capability, 0, 0, 0)
            except OSError:
                break  # past the last capability
    return identity


def enter(policy: Policy) -> list[str]:
    """Everything but the exec: a new identity, no new privileges, Landlock."""
    identity = _new_identity(policy)
    _syscall(_PRCTL, _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return [identity, "no-new-privs", *restrict(policy)]


def protect_agent() -> None:
    """Make this process non-dumpable: its /proc entries (environ, mem, fd, maps) then need
    CAP_SYS_PTRACE over it, which no sandboxed process has, whatever uid it runs as."""
    _syscall(_PRCTL, _PR_SET_DUMPABLE, 0, 0, 0, 0)


def probe() -> dict[str, object]:
    """What this machine offers the sandbox."""
    abi = landlock_abi()
    return {
        "landlock_abi": abi,
        "filesystem_rules": abi >= 1,
        "tcp_rules": abi >= 4,
        "scopes": abi >= 6,
    }


def main(argv: Sequence[str]) -> None:
    """`python -m shard_node.sandbox POLICY_JSON -- PROGRAM ARGS...`: run PROGRAM sandboxed."""
    if list(argv[:1]) == ["--probe"]:
        print(json.dumps(probe()))
        return
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m shard_node.sandbox POLICY_JSON -- PROGRAM [ARGS...]")
    policy = Policy.from_json(argv[0])
    try:
        enforced = enter(policy)
    except (SandboxError, OSError) as error:
        sys.exit(f"sandbox: {error}")
    print(f"sandbox: {' '.join(enforced)}", file=sys.stderr, flush=True)
    program = argv[2]
    os.execve(program, [program, *argv[3:]], policy.environment)


if __name__ == "__main__":
    main(sys.argv[1:])
