"""How a run computes: on which devices and processes (distributed.py: ``--device``, DDP and FSDP2 under
torchrun), in which precision (precision.py: weight and trainable dtypes, autocast, the fp16 loss scaler), on
which stored weights (quantize.py: a quantized frozen base through transformers' quantization_config), with
which attention kernel (attention.py: the folded bf16 CPU kernel the precision plan installs). The run's config
validates these options, the build applies them, the training loop runs under them; none of these modules
imports another package of ``randmask_lab.experiment``.

Only a docstring: importing one module of this package loads no other (transformers, bitsandbytes and torchao
are imported inside the functions that need them).
"""
