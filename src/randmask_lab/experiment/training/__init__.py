"""Training a run: ``run_training`` (train.py: claim the run in the store, assemble it, train or evaluate, write
its record), the loop (loop.py: ``Trainer``: epochs, steps, evaluation, best epoch), its per-step pieces
(steps.py: optimizer, LR schedule, step log) and resumable checkpoints (checkpoint.py).

Only a docstring: importing one module of this package loads no other.
"""
