"""The compiled half of the CUPTI journal: builds workers/cupti_callback.c once per host and loads it.

CUPTI's callback API calls its subscriber on the calling thread, inside the driver call; a Python callback
there would take the GIL inside another library's driver call. So the callback is a few lines of C (no
lock, no Python) that write a lock-free ring the serving thread drains. It is compiled the first time a
worker needs it, with the host's C compiler ($CC, else cc, gcc or clang), into a cache directory keyed by
the source's hash ($ORCHESTRATOR_CACHE_DIR, else $XDG_CACHE_HOME/orchestrator, else
~/.cache/orchestrator); later workers load the cached library. It needs no CUDA or CUPTI headers: the
callback is handed to cuptiSubscribe from here, through ctypes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cupti_callback.c")
FRAMES = 16  # as in the C source
#: Objects between the callback and the caller: the shim, CUPTI, the driver, the runtime.
NOT_THE_CALLER = re.compile(r"^(cupti_callback-|libcupti\.|libcuda\.|libcudart\.)")
#: A Python extension module's file name: the module, then its ABI tag (".cpython-312-x86_64-linux-gnu.so").
_EXTENSION = re.compile(r"^([^.]+)\.(cpython-[^.]+|abi3)\.so$")


class NativeUnavailable(Exception):
    """The callback library cannot be built or loaded here; the message says why in one line."""


class OpRecord(ctypes.Structure):
    _fields_ = [
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("tid", ctypes.c_uint32),
        ("cbid", ctypes.c_uint32),
        ("domain", ctypes.c_uint32),
        ("nframes", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
        ("frames", ctypes.c_uint64 * FRAMES),
    ]


def cache_dir() -> Path:
    env = os.environ.get("ORCHESTRATOR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "orchestrator"


def compiler() -> list[str] | None:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def library_path(out_dir: Path | None = None) -> Path:
    """Where the compiled callback for this source and machine is cached."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + sys.platform.encode() + os.uname().machine.encode()).hexdigest()[:16]
    return (out_dir or cache_dir()) / f"cupti_callback-{key}.so"


def build(out_dir: Path | None = None) -> Path:
    """The compiled callback library for this source, built now unless the cache has it."""
    lib = library_path(out_dir)
    out_dir = lib.parent
    if lib.exists():
        return lib
    cc = compiler()
    if cc is None:
        raise NativeUnavailable(
            "no C compiler (set CC, or install cc, gcc or clang) to build the CUPTI callback"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=lib.name, suffix=".tmp", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        raise NativeUnavailable(f"cannot write the CUPTI callback to {out_dir}: {exc}") from None
    cmd = [*cc, "-O2", "-shared", "-fPIC", "-Wall", "-o", tmp, str(SOURCE)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(tmp)
        raise NativeUnavailable(f"could not run {cc[0]}: {exc}") from None
    if res.returncode != 0:
        os.unlink(tmp)
        lines = res.stderr.strip().splitlines() or ["no output"]
        first = next((ln for ln in lines if "error:" in ln), lines[-1]).strip()
        raise NativeUnavailable(
            f"{cc[0]} could not build the CUPTI callback (exit {res.returncode}): {first}"
        )
    os.replace(tmp, lib)  # atomic: workers building at once each end with a whole library
    return lib


def library_name(path: str) -> str:
    """What a person reads for a loaded object: a Python extension module as its dotted name
    (cuda.bindings._bindings.cydriver), a library in a Python package with the package (libc10_cuda.so
    (torch)), else the file's name."""
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            rel = parts[parts.index(marker) + 1 :]
            break
    else:
        rel = ()
    name = Path(path).name
    ext = _EXTENSION.match(name)
    if rel and ext:
        return ".".join([*rel[:-1], ext.group(1)])
    return f"{name} ({rel[0]})" if len(rel) > 1 else name


class Native:
    """The loaded callback library: its function pointer for cuptiSubscribe, the ring, caller names."""

    def __init__(self, path: Path) -> None:
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NativeUnavailable(f"cannot load {path}: {exc}") from None
        self.path = path
        lib = self.lib
        lib.orch_cb_drain.argtypes = [ctypes.POINTER(OpRecord), ctypes.c_uint64]
        lib.orch_cb_drain.restype = ctypes.c_uint64
        lib.orch_cb_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        lib.orch_cb_stats.restype = None
        lib.orch_cb_object_of.argtypes = [ctypes.c_uint64]
        lib.orch_cb_object_of.restype = ctypes.c_char_p
        lib.orch_cb_callback.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p]
        lib.orch_cb_callback.restype = None
        self.callback_ptr = int(ctypes.cast(lib.orch_cb_callback, ctypes.c_void_p).value or 0)
        self._buf = (OpRecord * 1024)()
        self._callers: dict[int, str] = {}  # return address -> library name ("" for the skipped ones)
        stats = self.stats()
        if stats["record_bytes"] != ctypes.sizeof(OpRecord):
            raise NativeUnavailable(
                f"{path}: records of {stats['record_bytes']} bytes, expected {ctypes.sizeof(OpRecord)}"
            )

    def drain(self) -> list[OpRecord]:
        """Every record written since the last drain (copies; the serving thread is the one consumer)."""
        out: list[OpRecord] = []
        buf = self._buf
        while True:
            n = self.lib.orch_cb_drain(buf, len(buf))
            out.extend(OpRecord.from_buffer_copy(buf[i]) for i in range(n))
            if n < len(buf):
                return out

    def stats(self) -> dict[str, int]:
        v = (ctypes.c_uint64 * 4)()
        self.lib.orch_cb_stats(v)
        return {"written": v[0], "dropped": v[1], "ring": v[2], "record_bytes": v[3]}

    def caller(self, rec: OpRecord) -> str:
        """The library that made the call: the first object on the stack past the callback, CUPTI, the
        driver and the runtime; "" when the stack ends before it."""
        for i in range(min(rec.nframes, FRAMES)):
            addr = rec.frames[i]
            name = self._callers.get(addr)
            if name is None:
                obj = self.lib.orch_cb_object_of(addr - 1 if addr else 0)  # a return address: the call's
                path = obj.decode(errors="replace") if obj else ""
                name = "" if not path or NOT_THE_CALLER.match(Path(path).name) else library_name(path)
                self._callers[addr] = name
            if name:
                return name
        return ""


def load(out_dir: Path | None = None) -> Native:
    return Native(build(out_dir))
