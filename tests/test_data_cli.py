"""data_cli.py: data.py's command line prints the data report, turns a missing folder into one error line, and
runs as `python data.py`."""

import subprocess
import sys

from conftest import ROOT

import data_cli


def test_check_prints_the_data_report_of_the_isbi_stacks(isbi_dir, capsys):
    assert data_cli.main(["check", str(isbi_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data: images") and "split: isbi" in out
    assert "  validation: 3 page(s)" in out and "  test: 3 page(s)" in out


def test_check_of_a_folder_without_the_stacks_is_one_error_line(tmp_path, capsys):
    assert data_cli.main(["check", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ISBI 2012 data not found") and "data.py fetch" in err[0]


def test_data_py_runs_the_command_line():
    done = subprocess.run([sys.executable, "data.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "{fetch,download,check,example}" in done.stdout
