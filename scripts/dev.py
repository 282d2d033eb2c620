"""Set up a virtual environment in .venv and run the demo or the tests.

    python3 scripts/dev.py demo     # examples/quickstart.py
    python3 scripts/dev.py test     # the test suite (what CI runs)

Needs only python3. Installs roastfx in editable mode with its pinned
dependencies (torch 2.13.0 CPU build, triton 3.7.1) and the dev extras;
re-installs only when pyproject.toml changes.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup() -> None:
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".roastfx-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    print("installing roastfx and its dependencies into .venv (first run: a few minutes)", flush=True)
    # torch first, pinned, so no other requirement can pull a CUDA build
    subprocess.run([PY, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([PY, "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"], check=True)
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("demo", "test"):
        print("usage: python3 scripts/dev.py demo|test [extra args]", file=sys.stderr)
        return 2
    setup()
    if argv[0] == "demo":
        cmd = [PY, str(ROOT / "examples" / "quickstart.py"), *argv[1:]]
    else:
        # the tests in as many processes as there are cores, up to 4 (pytest-xdist; 2 cores: 5.5 instead of 9 min)
        workers = min(4, os.cpu_count() or 1)
        parallel = ["-n", str(workers)] if workers > 1 and not any(a.startswith("-n") for a in argv[1:]) else []
        cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15", *parallel, *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
