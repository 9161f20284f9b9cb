"""Build graphopt's native kernels (graphopt/ops/src/*.cc) into one onnxruntime custom-op library.

Headers come from, in order: the `ort_include` argument, $ORT_INCLUDE_DIR, /usr/include/onnxruntime, a
previous download in the user cache, or Debian's libonnxruntime-dev fetched now: `apt-get download`
through a private apt configuration in a temporary directory (its own sources.list naming trixie, its
own state and cache directories; the system's apt configuration and package database are not touched)
and unpacked with `dpkg-deb -x` into the user cache. The onnxruntime custom-op API is versioned: a
library built against older headers loads into a newer runtime. Nothing is copied into the repository.

Where no compiler or no headers can be found, `build_library` returns the reason instead of raising:
every model still runs through its function bodies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from graphopt.ir.files import not_regular

log = logging.getLogger(__name__)

HEADER = "onnxruntime_cxx_api.h"
DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
FLAGS = ["-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden"]


@dataclass
class BuildResult:
    library: Path | None
    include_dir: Path | None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"library": str(self.library) if self.library else None,
                "include_dir": str(self.include_dir) if self.include_dir else None, "reason": self.reason}


def sources() -> list[Path]:
    folder = resources.files("graphopt.ops") / "src"
    return sorted(Path(str(folder)).glob("*.cc"))


def headers() -> list[Path]:
    folder = resources.files("graphopt.ops") / "src"
    return sorted(Path(str(folder)).glob("*.h"))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphopt"


def default_library() -> Path:
    """The cache path of the library for the current kernel sources (a new source gives a new name)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*sources(), *headers()])).hexdigest()[:12]
    return cache_dir() / f"libgraphopt_ops-{digest}.so"


def _headers_in(folder: Path) -> Path | None:
    for candidate in (folder, folder / "onnxruntime", folder / "usr" / "include" / "onnxruntime"):
        if (candidate / HEADER).is_file():
            return candidate
    return None


def _apt_download(target: Path) -> str:
    """Fetch and unpack libonnxruntime-dev into `target`; '' on success, else why not."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "no apt-get/dpkg-deb to fetch Debian's libonnxruntime-dev"
    with tempfile.TemporaryDirectory(prefix="graphopt-apt-") as temp:
        root = Path(temp)
        for sub in ("etc/sources.list.d", "etc/preferences.d", "state/lists/partial", "cache/archives/partial", "deb"):
            (root / sub).mkdir(parents=True)
        (root / "etc/sources.list").write_text(f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
        options = [f"-oDir::Etc::SourceList={root}/etc/sources.list", f"-oDir::Etc::SourceParts={root}/etc/sources.list.d",
                   f"-oDir::Etc::Preferences={root}/etc/preferences", f"-oDir::Etc::PreferencesParts={root}/etc/preferences.d",
                   f"-oDir::State={root}/state", f"-oDir::State::Lists={root}/state/lists", "-oDir::State::status=/dev/null",
                   f"-oDir::Cache={root}/cache", "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=" + _user()]
        for step in (["update"], ["download", "libonnxruntime-dev"]):
            done = subprocess.run(["apt-get", *options, *step], cwd=root / "deb", capture_output=True, text=True,
                                  timeout=600)
            if done.returncode:
                return f"apt-get {step[0]} failed: {_last_line(done.stderr)}"
        debs = sorted((root / "deb").glob("libonnxruntime-dev_*.deb"))
        if not debs:
            return "apt-get download produced no libonnxruntime-dev package"
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], capture_output=True, text=True)
        if done.returncode:
            return f"dpkg-deb -x failed: {_last_line(done.stderr)}"
        (target / "SOURCE").write_text(debs[-1].name + "\n")
    return ""


def _user() -> str:
    import getpass

    return getpass.getuser()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def find_headers(ort_include: Path | None = None, *, download: bool = True) -> tuple[Path | None, str]:
    """(folder holding onnxruntime_cxx_api.h, '') or (None, why none was found)."""
    if ort_include is not None:
        found = _headers_in(Path(ort_include))
        return (found, "") if found else (None, f"no {HEADER} under --ort-include {ort_include}")
    if os.environ.get("ORT_INCLUDE_DIR"):
        found = _headers_in(Path(os.environ["ORT_INCLUDE_DIR"]))
        return (found, "") if found else (None, f"no {HEADER} under ORT_INCLUDE_DIR={os.environ['ORT_INCLUDE_DIR']}")
    downloaded = cache_dir() / "libonnxruntime-dev"
    for folder in (Path("/usr/include/onnxruntime"), downloaded):
        found = _headers_in(folder)
        if found:
            return found, ""
    if not download:
        return None, "no onnxruntime headers (give --ort-include or ORT_INCLUDE_DIR)"
    log.info("fetching Debian %s libonnxruntime-dev into %s", DEBIAN_SUITE, downloaded)
    try:
        reason = _apt_download(downloaded)
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"fetching libonnxruntime-dev failed: {exc}"
    found = None if reason else _headers_in(downloaded)
    return (found, "") if found else (None, reason or f"libonnxruntime-dev held no {HEADER}")


def build_library(output: Path | None = None, ort_include: Path | None = None, *,
                  download: bool = True) -> BuildResult:
    """Compile every kernel source into `output` (default: `default_library()`)."""
    target = Path(output) if output is not None else default_library()
    refused = not_regular(target)
    if refused:
        return BuildResult(None, None, f"cannot write the library: {refused}")
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        return BuildResult(None, None, "no C++ compiler (g++ or $CXX)")
    include, reason = find_headers(ort_include, download=download)
    if include is None:
        return BuildResult(None, None, reason)
    target.parent.mkdir(parents=True, exist_ok=True)
    # compiled beside the target, then renamed over it: a failed or interrupted build never leaves a partial
    # library, and a process that has the old one loaded keeps its (unlinked) copy
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    command = [compiler, *FLAGS, f"-I{include}", *map(str, sources()), "-o", str(staging)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return BuildResult(None, include, f"compiling failed: {_last_line(done.stderr)}")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    log.info("built %s", target)
    return BuildResult(target, include)
