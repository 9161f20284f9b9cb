"""`graphopt ops build`: a failed build is an error, and it never damages the library it would replace."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from graphopt import cli


def test_a_failing_compiler_exits_1_and_leaves_the_existing_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    library = tmp_path / "libgraphopt_ops.so"
    library.write_bytes(b"the library a running process has loaded")
    compiler = tmp_path / "failing-cxx"
    compiler.write_text("#!/bin/sh\necho 'error: no such instruction' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(compiler))
    assert cli.main(["ops", "build", "-o", str(library)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("graphopt: error: native kernels not built: compiling failed") and err.count("\n") == 1
    assert library.read_bytes() == b"the library a running process has loaded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing-cxx", "libgraphopt_ops.so"]  # no staging left


def test_a_device_as_the_output_is_refused_before_compiling(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["ops", "build", "-o", "/dev/null"]) == 1
    assert "/dev/null is a device, not a regular file" in capsys.readouterr().err
