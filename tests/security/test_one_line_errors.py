"""D6: the project's input errors leave `python -m monai.bundle run` and `python -m pipelines` as one line
``error: <file>: <problem>`` with exit code 2; NEURO_DEBUG=1 brings the traceback back; bugs keep theirs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from pipelines.errors import find_input_error, one_line
from pipelines.io.dicom import DicomSeriesError
from pipelines.io.images import ImageLoadError
from tests.security.bounded import REPO_ROOT


def _bundle_run(tmp_path, run: str, debug: bool = False) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"imports": ["$import pipelines", "$import pipelines.io.dicom"],
                               "input_path": str(tmp_path / "empty"), "run": [run]}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("NEURO_DEBUG", None)
    if debug:
        env["NEURO_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))


def test_bundle_input_error_is_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _bundle_run(tmp_path, "$pipelines.io.dicom.load_series(@input_path)")
    assert proc.returncode == 2
    # MONAI's own log lines come first; the error is one line at the end, no traceback
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'empty'}: folder contains no files"
    assert "Traceback" not in proc.stderr and "Failed to" not in proc.stderr
    debug = _bundle_run(tmp_path, "$pipelines.io.dicom.load_series(@input_path)", debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DicomSeriesError" in debug.stderr


def test_bugs_keep_their_traceback(tmp_path):
    proc = _bundle_run(tmp_path, "$1 / 0")
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr and "Traceback" in proc.stderr


def test_root_cause_is_found_through_monai_wrappers():
    try:
        try:
            raise DicomSeriesError("/data/x: folder contains no\nfiles")
        except DicomSeriesError as e:
            raise RuntimeError("Failed to evaluate ...") from e
    except RuntimeError as wrapped:
        assert one_line(find_input_error(wrapped)) == "error: /data/x: folder contains no files"
    assert find_input_error(ZeroDivisionError()) is None
    assert find_input_error(ValueError("not ours")) is None


def _cli_with(monkeypatch, exc):
    import pipelines.cli as cli

    def fake_parser():
        parser = argparse.ArgumentParser()
        parser.set_defaults(func=lambda args: (_ for _ in ()).throw(exc))
        return parser

    monkeypatch.setattr(cli, "build_parser", fake_parser)
    return cli.main([])


def test_pipelines_cli_input_error_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("NEURO_DEBUG", raising=False)
    assert _cli_with(monkeypatch, ImageLoadError("/data/a.png: corrupt or truncated image")) == 2
    assert capsys.readouterr().err == "error: /data/a.png: corrupt or truncated image\n"
    monkeypatch.setenv("NEURO_DEBUG", "1")
    with pytest.raises(ImageLoadError):
        _cli_with(monkeypatch, ImageLoadError("/data/a.png: corrupt"))
    monkeypatch.delenv("NEURO_DEBUG")
    with pytest.raises(ZeroDivisionError):
        _cli_with(monkeypatch, ZeroDivisionError("bug"))
