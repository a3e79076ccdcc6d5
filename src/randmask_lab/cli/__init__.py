"""The ``randmask`` command: ``main`` is its entry point (pyproject's ``[project.scripts]``).

    app.py      the parser and the error handling (one line, exit code 2, for the user's mistakes)
    common.py   what the verbs share (the results store a verb reads, who prints under torchrun)
    runs.py     train, sweep, main
    results.py  report, curves, calibrate-lr, list
    study.py    study, export, merge, findings, report --from
The analysis and theory verbs register from ``randmask_lab.analysis.cli`` and ``randmask_lab.theory.cli``.
"""

from randmask_lab.cli.app import USER_ERRORS, build_parser, main

__all__ = ["USER_ERRORS", "build_parser", "main"]
