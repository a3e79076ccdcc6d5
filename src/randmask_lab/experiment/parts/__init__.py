"""Building a run: ``assemble(config) -> RunParts`` (assemble.py) turns a ``RunConfig`` into the task data, the
tokenised items (data.py), the prepared model and its objective (lm.py: causal-LM prompts; head.py: an encoder
with a classification head). analysis_inputs.py builds the same parts for the analysis verbs (hessian, distance,
suggest-lr), with a trained run's weights loaded. It is the one build path of training, the analysis and the
benchmarks. budget.py checks, before a sweep or a study runs, that every masking ratio fits its model's shapes.

Only a docstring: importing one module of this package loads no other.
"""
