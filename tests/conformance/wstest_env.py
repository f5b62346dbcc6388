"""Autobahn Testsuite's ``wstest``, in a Python 2.7 virtualenv built once in ``.venv-wstest/``.

The fuzzing client (autobahntestsuite 0.8.2 on autobahn 0.10.9 and Twisted 20.3) runs on Python 2.7
only. The virtualenv is made by ``virtualenv<20.22`` (the last releases that create 2.7 environments),
itself installed with pip into ``.venv-wstest/bootstrap``, and the suite from the exact pins below. A
complete build leaves ``.venv-wstest/.complete`` holding those pins; a missing or different one means
build again from scratch. Concurrent builders wait on a lock.

    python tests/conformance/wstest_env.py      # build if needed, print the wstest path

The Python 2.7 interpreter: ``$FONANA_WS_PYTHON27``, else ``pyenv prefix 2.7.18``, else ``python2.7`` on
the PATH, else pyenv's default location.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".venv-wstest"
ENV = CACHE / "py27"
BOOTSTRAP = CACHE / "bootstrap"
MARKER = CACHE / ".complete"
WSTEST = ENV / "bin" / "wstest"

VIRTUALENV = "virtualenv==20.21.1"
#: The full closure of autobahntestsuite 0.8.2 as pip resolves it on Python 2.7 (the last releases of
#: each that still support 2.7). wsaccel and zope.interface build from source (a C compiler is needed).
PINS = (
    "autobahntestsuite==0.8.2",
    "autobahn==0.10.9",
    "txaio==2.1.0",
    "Twisted==20.3.0",
    "Automat==22.10.0",
    "attrs==21.4.0",
    "constantly==15.1.0",
    "hyperlink==21.0.0",
    "idna==2.10",
    "incremental==22.10.0",
    "PyHamcrest==1.10.1",
    "zope.interface==5.5.2",
    "klein==20.6.0",
    "Tubes==0.2.1",
    "Werkzeug==1.0.1",
    "enum34==1.1.10",
    "typing==3.10.0.0",
    "Jinja2==2.11.3",
    "MarkupSafe==1.1.1",
    "pyOpenSSL==21.0.0",
    "cryptography==3.3.2",
    "cffi==1.15.1",
    "pycparser==2.21",
    "ipaddress==1.0.23",
    "service-identity==21.1.0",
    "pyasn1==0.5.1",
    "pyasn1-modules==0.3.0",
    "six==1.17.0",
    "wsaccel==0.6.6",
    "ujson==2.0.3",
    "unittest2==1.1.0",
    "traceback2==1.4.0",
    "linecache2==1.0.0",
    "argparse==1.4.0",
)
#: What ``.complete`` must hold for the cache to be reused.
STAMP = "\n".join((VIRTUALENV, *PINS)) + "\n"


class BuildError(Exception):
    """wstest could not be built here; the message says why."""


def python27() -> str:
    """The Python 2.7 interpreter to build with, or BuildError naming where it was looked for."""
    explicit = os.environ.get("FONANA_WS_PYTHON27")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BuildError(f"FONANA_WS_PYTHON27={explicit} is not an executable")
        return explicit
    candidates = []
    if shutil.which("pyenv"):
        try:
            prefix = subprocess.run(
                ["pyenv", "prefix", "2.7.18"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            candidates.append(os.path.join(prefix, "bin", "python"))
        except (subprocess.SubprocessError, OSError):
            pass
    if found := shutil.which("python2.7"):
        candidates.append(found)
    candidates.append(os.path.expanduser("~/.pyenv/versions/2.7.18/bin/python"))
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BuildError(
        "no Python 2.7 (set FONANA_WS_PYTHON27, or install CPython 2.7.18 with pyenv); looked at "
        + ", ".join(candidates)
    )


def ready() -> bool:
    return WSTEST.is_file() and MARKER.is_file() and MARKER.read_text() == STAMP


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def build(log: bool = False) -> Path:
    """The wstest executable, built into ``.venv-wstest/`` unless a complete build is there already."""
    if ready():
        return WSTEST
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it right now
        if ready():
            return WSTEST
        py27 = python27()
        for path in (ENV, BOOTSTRAP, MARKER):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if log:
            print(f"building wstest in {ENV} with {py27}", file=sys.stderr)
        _run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(BOOTSTRAP), VIRTUALENV],
            "installing virtualenv",
        )
        env = {**os.environ, "PYTHONPATH": str(BOOTSTRAP)}
        _run(
            [sys.executable, "-m", "virtualenv", "-q", "--no-download", "-p", py27, str(ENV)],
            "creating the Python 2.7 virtualenv",
            env,
        )
        _run(
            [str(ENV / "bin" / "python"), "-m", "pip", "install", "-q", "--no-warn-script-location", *PINS],
            "installing autobahntestsuite",
        )
        _run([str(WSTEST), "--help"], "running wstest --help")
        MARKER.write_text(STAMP)
    return WSTEST


if __name__ == "__main__":
    try:
        print(build(log=True))
    except BuildError as exc:
        sys.exit(f"wstest not built: {exc}")
