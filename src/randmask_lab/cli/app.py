"""``randmask <verb>``: the parser (the verbs live in runs.py, results.py, study.py, and the analysis and theory
packages' ``cli`` modules) and the error handling.

Bad input (unknown task/model/method, missing data, impossible budgets) ends with exit code 2 and
a one-line message; set RANDMASK_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence

from randmask import MaskingError, __version__
from randmask_lab.analysis import cli as analysis
from randmask_lab.cli import results, runs, study
from randmask_lab.errors import LabError, MissingPackageError
from randmask_lab.fs import disk_problem
from randmask_lab.theory import cli as theory

USER_ERRORS: tuple[type[BaseException], ...] = (MaskingError, LabError)
"""Printed as one line with exit code 2; every other exception is internal and keeps its traceback."""

# The lab's optional packages, for a verb whose import fails: a one-line error naming the package.
OPTIONAL_PACKAGES = {"transformers", "peft", "datasets", "matplotlib", "tqdm", "gguf", "ray", "accelerate"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``randmask`` command."""
    parser = argparse.ArgumentParser(prog="randmask", description="Random Masking fine-tuning experiments.")
    parser.add_argument("--version", action="version", version=f"randmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in (runs.add_train, runs.add_sweep, results.add_report, results.add_curves, results.add_calibrate_lr,
                runs.add_main, results.add_list, theory.register, analysis.register, study.register):
        add(sub)  # the analysis and theory verbs import their heavy packages when they run
    return parser


def _quiet_transformers() -> None:
    """No per-file loading bars or load reports: a run prints its own progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft 0.21 calls a transformers 5 method that warns of its own deprecation on every LoRA run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message matches one of ``patterns``; lets every other record through."""

    def __init__(self, *patterns: str) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.search(record.getMessage()) for p in self.patterns)


def _quiet_quantization_backends() -> None:
    """No "Failed to load .../_C_mxfp8....so" on every command. transformers imports torchao whenever it is installed
    (the ``quantized`` extra), and torchao 0.18's wheel carries CUDA kernels (MX-FP8, CUTLASS sm90a) built for
    another Python and GPU that never load here; randmask uses none of them (its torchao bases are int8/int4
    weight-only). Also torch's note that torchao's enum registration is deprecated, which is for torchao's
    developers. And bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" on a CPU with
    AVX512-bf16: a fused kernel for repacked 4-bit weights, native code from the Hub that its ``kernels`` package
    refuses (unverified publisher; randmask loads no unverified native code), and that randmask never calls, as it
    keeps the repacking off (``randmask.disable_bnb_cpu_repacking``). Every other message of theirs still shows."""
    for name, pattern in (("torchao", r"^Failed to load \S*_C_(mxfp8|cutlass)"),
                          ("torch.utils._pytree", r"is an Enum subclass and is now natively supported"),
                          ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-")):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):  # main() runs many times in one test process
            logger.addFilter(_DropMessages(pattern))


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def _stdout_gone() -> int:
    """The reader of stdout went away (``randmask report ... | head``): end quietly, as a shell tool does, with
    128 + SIGPIPE; stdout is pointed at /dev/null so that the flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (an in-process capture)
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``randmask`` command; returns the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_quantization_backends()  # before _quiet_transformers imports transformers (and with it torchao)
    _quiet_transformers()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        try:
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a reader gone away (`| head`) shows here, not as a traceback at exit
            return code
        except ModuleNotFoundError as e:
            package = (e.name or "").split(".")[0]
            if package not in OPTIONAL_PACKAGES:
                raise
            raise MissingPackageError(f"`randmask {args.command}` needs the package {package!r}, which is not "
                                      f"installed: pip install 'randmask[lab]' (or pip install {package})") from e
    except BrokenPipeError:
        return _stdout_gone()
    except (*USER_ERRORS, OSError) as e:
        # A full disk or a read-only folder is the user's to fix (randmask_lab.fs); any other OSError is internal.
        message = str(e) if isinstance(e, USER_ERRORS) else disk_problem(e)
        if message is None or os.environ.get("RANDMASK_DEBUG"):
            raise
        print(f"randmask {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
