"""Studies: a sweep's records as committed data, with statistics, figures and verdicts.

``records``: export a results store to JSONL and read it back (no store needed to check a number).
``stats``: t intervals over seeds, differences paired by seed. ``cells``: the best-LR cell of every
(model, protocol, task, method). ``tables``, ``figures``: the study's tables and PNGs.
``findings``: HOLDS / DOES NOT HOLD / INCONCLUSIVE for each of the paper's findings.
``plan``, ``run``: what a spec needs next, and running it. ``forecast``, ``power``: the compute left and the seeds
each comparison needs.
"""
