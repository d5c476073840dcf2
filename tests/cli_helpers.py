"""Run ``automl ARGS`` inside the test process: the entry point's own code, without a subprocess that would
spend most of its time importing torch (tests/test_cli.py keeps one real-process check)."""
import contextlib
import io
from types import SimpleNamespace

from automl.cli import main


def run_cli(*args) -> SimpleNamespace:
    """Exit code (``returncode``), ``stdout`` and ``stderr`` of ``automl ARGS``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
