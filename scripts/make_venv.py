"""Make the virtual environment the Makefile runs everything in, with the Python that runs this script.

Debian's and Ubuntu's system Python refuses `pip install` outside a virtual environment (PEP 668), and without
the python3-venv package its `venv` makes an environment without pip (ensurepip is left out). So, in order:
`python3 -m venv`; else an environment without pip, into which the system's own pip (python3-pip) installs pip;
else one into which pip's wheel from PyPI installs itself (the way get-pip works). The folder is marked ready
(DIR/.ready) only when its pip runs, so a half-made one is made again on the next run.

    python3 scripts/make_venv.py .venv
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

MINIMUM = (3, 11)
PYPI_PIP = "https://pypi.org/pypi/pip/json"


def main(folder: Path) -> int:
    if sys.version_info < MINIMUM:
        print(f"precompute-cli needs Python {'.'.join(map(str, MINIMUM))} or newer, and {sys.executable} is "
              f"{sys.version.split()[0]}: run make SYSTEM_PYTHON=python3.11 (or newer), or make PYTHON=... with "
              "the Python of an environment you made", file=sys.stderr)
        return 1
    (folder / ".ready").unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    python = folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    made = subprocess.run([sys.executable, "-m", "venv", str(folder)]).returncode == 0
    if not (made and _has_pip(python)):
        print(f"{folder}: venv gave no pip (on Debian/Ubuntu that is the python3-venv package); installing pip "
              "into it another way", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        if subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)]).returncode != 0:
            print(f"{folder}: {sys.executable} cannot make a virtual environment at all", file=sys.stderr)
            return 1
        if not (_pip_from_system(python) or _pip_from_pypi(python)):
            print(f"{folder}: could not install pip into the new environment: install python3-venv (Debian, "
                  "Ubuntu), or activate a virtual environment of your own and run make again", file=sys.stderr)
            return 1
    (folder / ".ready").touch()
    return 0


def _has_pip(python: Path) -> bool:
    return python.exists() and subprocess.run([str(python), "-m", "pip", "--version"],
                                              capture_output=True).returncode == 0


def _pip_from_system(python: Path) -> bool:
    """The system's pip (22.3+ has --python) installs pip into the environment; PEP 668 does not apply there."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        return False
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "pip"])
    return _has_pip(python)


def _pip_from_pypi(python: Path) -> bool:
    """pip's wheel runs from the wheel itself: `python pip.whl/pip install pip.whl` (what get-pip.py does)."""
    try:
        with urllib.request.urlopen(PYPI_PIP, timeout=60) as response:
            release = json.load(response)
        url = next(u["url"] for u in release["urls"] if u["filename"].endswith("-py3-none-any.whl"))
        url = urllib.parse.urljoin(PYPI_PIP, url)  # absolute on PyPI; relative through some mirrors
        with tempfile.TemporaryDirectory() as tmp:
            wheel = Path(tmp) / urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]
            with urllib.request.urlopen(url, timeout=300) as response:
                wheel.write_bytes(response.read())
            subprocess.run([str(python), str(wheel / "pip"), "install", "--quiet", "--no-index", str(wheel)])
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        print(f"could not fetch pip from PyPI ({exc})", file=sys.stderr)
        return False
    return _has_pip(python)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
