"""Many runs: grids over model x task x method x budget x lr x seed (sweep.py: resumable, leased, safe to run as
several workers on one store), where a grid's runs execute (executors/: in this process, or as Ray tasks), and
the default comparison of ``randmask main`` (main_job.py).

Only a docstring: importing one module of this package loads no other.
"""
