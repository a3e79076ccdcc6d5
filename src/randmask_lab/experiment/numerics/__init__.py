"""How a run holds its numbers: ``--precision`` (precision.py: weight and trainable dtypes, autocast, the fp16
loss scaler), ``--quantize`` (quantize.py: a quantized frozen base through transformers' quantization_config),
and the folded bf16 CPU attention kernel the precision plan installs (attention.py). The run's config validates
these options, the build applies them, the training loop runs under them.

Only a docstring: importing one module of this package loads no other (transformers, bitsandbytes and torchao
are imported inside the functions that need them).
"""
