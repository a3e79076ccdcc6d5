"""What a run is: ``RunConfig`` (config.py: its fields, their validation, the run's identity and id), the CLI
options generated from its fields (options.py), and the data a run reads (sources.py: the fingerprint that goes
into the id, where each split came from). Nothing here loads a model or data.

Only a docstring: importing one module of this package loads no other.
"""
