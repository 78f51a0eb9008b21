"""Fetching what is not installed, as subprocesses: Debian packages (``apt-get download`` + ``dpkg-deb -x``
under the data dir), the R data packages they hold (found extracted there or installed by apt), and pip
(``run_pip``). Each error message carries the set-up lines to run by hand."""

from __future__ import annotations

import os
from pathlib import Path

from .base import data_dir

# Debian's R data packages (r-cran-janeaustenr, r-cran-modeldata): fetched with ``apt-get download`` and
# ``dpkg-deb -x`` under the data dir, or found where ``apt-get install`` puts them; read with rdata.


def r_deb_setup_lines(deb: str, data_name: str, root) -> str:
    """The shell lines that set a Debian R data package up by hand (what ``python -m fastdfa data`` does)."""
    return (f"apt-get update -qq && cd /tmp && apt-get download {deb} && "
            f"dpkg-deb -x /tmp/{deb}_*_all.deb {data_dir(root) / deb}\n"
            f"pip install rdata && python -m fastdfa data {data_name}")


def r_package_candidates(deb: str, package: str, root) -> list[Path]:
    """Where R package ``package`` is looked for: extracted from ``deb`` under the data dir, or installed."""
    return [data_dir(root) / deb / "usr/lib/R/site-library" / package,
            Path("/usr/lib/R/site-library") / package, Path("/usr/local/lib/R/site-library") / package]


def find_r_package(candidates: list[Path]) -> Path | None:
    for directory in candidates:
        if (directory / "data" / "Rdata.rdx").is_file() and (directory / "data" / "Rdata.rdb").is_file():
            return directory
    return None


def download_r_package(deb: str, package: str, root, manual: str) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` of ``deb`` under the data dir; the R package it holds."""
    target = data_dir(root) / deb
    apt_download_extract(deb, target, manual)
    found = find_r_package(r_package_candidates(deb, package, root))
    if found is None:
        raise FileNotFoundError(f"{deb} extracted to {target} but holds no R data "
                                f"(expected usr/lib/R/site-library/{package}/data/Rdata.rdx)")
    return found


def apt_download_extract(deb: str, target: Path, manual: str) -> Path:
    """``apt-get download deb`` into a temporary folder and ``dpkg-deb -x`` it into ``target``; as root,
    fetches the package lists once (``apt-get update``) when the download finds none. ``manual``: the
    set-up lines an error message gives."""
    import shutil
    import subprocess
    import tempfile

    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} not found: the data comes from Debian's {deb}. On a Debian/Ubuntu "
                                    f"machine run:\n{manual}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run(["apt-get", "download", deb], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            proc = subprocess.run(["apt-get", "download", deb], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{deb}_*.deb"))
        if proc.returncode != 0 or not debs:
            why = proc.stderr.strip() or proc.stdout.strip()
            raise FileNotFoundError(f"apt-get download {deb} failed ({why}). Run `apt-get update` first (as root), "
                                    f"or set up by hand:\n{manual}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
    return target


def run_pip(*args: str) -> tuple[int, str]:
    """``python -m pip ARGS`` in this environment, its output captured: the exit status and the last line of
    the output (stderr, else stdout; "no output" when it printed nothing), for an error message."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
    return proc.returncode, why[0]
