"""Keeping results: what a run leaves behind (record.py: ``RunRecord``, the code version), the SQLite results
store with its leases on runs in progress (store.py: ``ResultStore``), and the best-LR tables read from it
(report.py).

Only a docstring: importing one module of this package loads no other.
"""
