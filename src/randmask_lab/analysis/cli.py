"""`randmask hessian | distance | suggest-lr | activations | figure4`: the analysis commands (JSON, PNG to --out).

Wire into the main CLI with ``register(subparsers)``; each handler is stored as ``args.func`` and
returns an exit code. Building the model and batches from the command line (model spec, task,
method, budget, adapter directory) is the experiment runner's job: the handlers call
``randmask_lab.experiment.build_model_and_batches(args) -> (model, batches, loss_fn)`` with the
parsed arguments; ``loss_fn`` is the run's own training objective. The ``run_*`` functions hold
the command logic and take a model directly (for tests and notebooks).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randmask import count_base_parameters, read_limited
from randmask_lab.analysis.hvp import LossFn
from randmask_lab.analysis.runs import activations_markdown, run_activations, run_distance, run_hessian, run_suggest_lr
from randmask_lab.analysis.suggest_lr import ADAM_CALIBRATION
from randmask_lab.argtypes import non_negative_int, positive_float, positive_int
from randmask_lab.errors import RunError


def load_state_dict(path: str | Path, max_bytes: int = 1 << 40) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, read through the bounded reader (a regular file of at
    most ``max_bytes``). A torch file goes through torch's ``weights_only`` loader: plain tensors only, anything
    else in the pickle is refused (never run) with a one-line RunError."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    data = read_limited(path, max_bytes, "reference weights", error=RunError,
                        fix="pass the pretrained model's .safetensors (or a torch state dict of tensors only)")
    try:
        if path.suffix == ".safetensors":
            return st_load(data)
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        raise RunError(f"reference weights {path} cannot be read safely ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:100]}); randmask never runs the code a pickle holds. Save the "
                       "reference as .safetensors (safetensors.torch.save_file)") from None
    if not (isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise RunError(f"reference weights {path} are not a state dict of tensors; pass the pretrained model's "
                       ".safetensors")
    return loaded


def reference_limit(model: nn.Module) -> int:
    """The most bytes a reference state dict of ``model`` can need: two fp64 copies of its parameters (buffers and
    tied names included), plus the file's header."""
    return 16 * count_base_parameters(model) + (64 << 20)


def _build(args: argparse.Namespace) -> tuple[nn.Module, list, LossFn, dict[str, Any]]:
    try:
        from randmask_lab.experiment import build_model_and_batches, describe_analysis_run
    except ImportError as err:
        if err.name != "randmask_lab.experiment":
            raise
        raise SystemExit(
            f"`randmask {args.command}` needs randmask_lab.experiment.build_model_and_batches(args) -> "
            "(model, batches, loss_fn), which this install does not have yet. From Python, call "
            "randmask_lab.analysis.runs.run_hessian / run_distance / run_suggest_lr with a model instead."
        ) from None
    # loss_fn is the run's own training objective (not model(**batch).loss): see AnalysisInputs.
    model, batches, loss_fn = build_model_and_batches(args)
    return model, list(batches), loss_fn, describe_analysis_run(args)


def _measurable(model: nn.Module, meta: dict[str, Any]) -> None:
    """A RunError when nothing is trainable (--method zeroshot): there is no Hessian w.r.t. the trainable
    parameters to measure, and the measuring code would only say so in a ValueError traceback."""
    if not any(p.requires_grad for p in model.parameters()):
        raise RunError(f"--method {meta.get('method')} trains no parameters, so there is nothing to measure; "
                       "pass a method that trains some (randmask, lora, full, ...) or a run folder as --adapter")


def _cmd_hessian(args: argparse.Namespace) -> int:
    if args.lanczos_steps is not None and not args.top_k:
        raise RunError("--lanczos-steps sets the Lanczos run of --top-k; pass --top-k K too, or drop it")
    model, batches, loss_fn, meta = _build(args)
    _measurable(model, meta)
    try:
        s = run_hessian(model, batches, args.out, loss_fn=loss_fn, tol=args.tol, max_iter=args.max_iter,
                        seed=args.power_seed, which=args.which, top_k=args.top_k,
                        lanczos_steps=args.lanczos_steps, meta=meta)
    except (ValueError, FloatingPointError) as e:  # nothing to measure, a non-finite loss: one line, not a traceback
        raise RunError(f"{args.command}: {e}") from None
    print(f"lambda_max = {s['lambda_max']:.6g} ({'converged' if s['converged'] else 'NOT converged'} "
          f"after {s['iterations']} HVPs); wrote {s['files']['json']}")
    if args.top_k:
        print("top-k: " + ", ".join(f"{v:.6g} (±{b:.2g})" for v, b in zip(s["top_k"], s["top_k_error_bounds"]))
              + f" after {s['lanczos_steps'] or 'the default'} Lanczos steps; a bound near the gaps between values "
              "says raise --lanczos-steps")
    return 0


def _cmd_distance(args: argparse.Namespace) -> int:
    model, _, _, meta = _build(args)
    reference = load_state_dict(args.reference, reference_limit(model)) if args.reference else None
    try:
        s = run_distance(model, args.out, reference, meta=meta)
    except ValueError as e:  # a model with nothing to compare (no randmask layers, no --reference)
        raise RunError(str(e)) from None
    left_out = (f" (not counted: {len(s['unmatched'])} trained parameters with no pretrained value, e.g. "
                f"{s['unmatched'][0]})" if s.get("unmatched") else "")  # a partial total never reads as the whole
    print(f"distance = {s['total']:.6g} over {len(s['per_matrix'])} matrices{left_out}; wrote {s['files']['json']}")
    return 0


def _cmd_suggest_lr(args: argparse.Namespace) -> int:
    model, batches, loss_fn, meta = _build(args)
    _measurable(model, meta)
    try:
        s = run_suggest_lr(model, batches, args.out, loss_fn=loss_fn, calibration=args.calibration, tol=args.tol,
                           max_iter=args.max_iter, seed=args.power_seed, meta=meta)
    except (ValueError, FloatingPointError) as e:  # λ_max <= 0, a zero gradient (suggest_lr says what to do)
        raise RunError(f"{args.command}: {e}") from None
    print(f"lambda_max = {s['lambda_max']:.4g}, GD bound 2/lambda = {s['gd_bound']:.4g}, "
          f"Adam lr ~ {s['adam_lr']:.3g} (try {s['adam_lr_low']:.3g} .. {s['adam_lr_high']:.3g}); "
          f"wrote {s['files']['json']}")
    return 0


def _cmd_activations(args: argparse.Namespace) -> int:
    model, batches, loss_fn, meta = _build(args)
    try:
        s = run_activations(model, batches, args.out, loss_fn=loss_fn, modules=args.modules,
                            features=args.features, top=args.top, meta=meta)
    except ValueError as e:  # no such module, a feature out of range: the user's options
        raise RunError(str(e)) from None
    print(activations_markdown(s, args.features))
    print(f"wrote {s['files']['json']}")
    return 0


def _cmd_figure4(args: argparse.Namespace) -> int:
    from randmask_lab.analysis.figure4 import figure4, localization_markdown, markdown

    rows, files = figure4(args.folders, args.out)
    print(markdown(rows))
    where = localization_markdown(rows)
    if where:
        print(f"\nWhere the top Hessian direction lives:\n\n{where}")
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _model_args(parser: argparse.ArgumentParser, out: str, batches: bool = True) -> None:
    """What ``build_model_and_batches(args)`` reads, plus the output folder; ``batches=False`` for a command that
    reads no batches (distance), so that it does not accept --num-batches / --batch-size only to ignore them."""
    g = parser.add_argument_group("model and data (built by randmask_lab.experiment)")
    g.add_argument("--model", help="base model spec (Hub id, local path, or a preset name)")
    g.add_argument("--adapter", type=Path, help="a run folder, or a randmask adapter folder, to load onto the model; "
                   "its own config says what was trained (options that contradict it are refused)")
    g.add_argument("--task", help="task whose training batches define the loss")
    # No default here: with --adapter, an option that was not given takes the run's value (None = not given).
    g.add_argument("--method", help="fine-tuning method (decides what is trainable); default: randmask, or the "
                   "--adapter's")
    g.add_argument("--trainable-ratio", type=float, help="budget: fraction of all parameters to train")
    if batches:
        g.add_argument("--num-batches", type=positive_int, default=4, help="batches the loss is averaged over")
        g.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch")
    else:  # the model is still built like a run's: one one-example batch, never read
        parser.set_defaults(num_batches=1, batch_size=1)
    g.add_argument("--seed", type=int, help="seed of the mask and the batch sample; default: 0, or the --adapter's")
    g.add_argument("--freeze-head", action="store_true",
                   help="classification-head mode: hold the task head fixed, so that only the method's own "
                   "parameters count as trainable (the head trains in every method and would dominate)")
    parser.add_argument("--out", type=Path, default=Path(out), help="output directory")


def _power_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tol", type=positive_float, default=1e-3, help="relative change of λ at which to stop")
    parser.add_argument("--max-iter", type=positive_int, default=100, help="cap on power-iteration steps (HVPs)")
    parser.add_argument("--power-seed", type=non_negative_int, default=0, help="seed of the random start vector")


_FMT = argparse.ArgumentDefaultsHelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the analysis sub-commands (hessian, distance, suggest-lr, activations, figure4) to a parent's subparsers."""
    for add in (_add_hessian, _add_distance, _add_suggest_lr, _add_activations, _add_figure4):
        add(subparsers)


def _add_hessian(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``hessian`` sub-command."""
    p = subparsers.add_parser("hessian", formatter_class=_FMT,
                              help="top eigenvalue of the loss Hessian w.r.t. the trainable parameters",
                              description="Power iteration on exact Hessian-vector products (paper Fig. 4a). "
                              "Writes hessian.json and power_trace.png.")
    _model_args(p, "runs/analysis")
    _power_args(p)
    p.add_argument("--which", choices=["top", "magnitude"], default="top",
                   help="top: largest eigenvalue (shifted re-run if the dominant one is negative); "
                   "magnitude: signed eigenvalue of largest |λ|")
    p.add_argument("--top-k", type=non_negative_int, default=0,
                   help="also the k largest eigenvalues by Lanczos (0: off), each with its error bound")
    p.add_argument("--lanczos-steps", type=positive_int, default=None,
                   help="Lanczos HVPs for --top-k (default max(2k + 10, 20)); raise it when the bounds are large")
    p.set_defaults(func=_cmd_hessian, command="hessian")


def _add_distance(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distance`` sub-command."""
    p = subparsers.add_parser("distance", formatter_class=_FMT, help="L2 distance from the pretrained weights",
                              description="Per-matrix and total L2 norm of the fine-tuning delta (paper "
                              "Fig. 4b). Writes distance.json.")
    _model_args(p, "runs/analysis", batches=False)
    p.add_argument("--reference", type=Path,
                   help="pretrained weights (.safetensors / torch state dict); optional for randmask")
    p.set_defaults(func=_cmd_distance, command="distance")


def _add_suggest_lr(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``suggest-lr`` sub-command."""
    p = subparsers.add_parser("suggest-lr", formatter_class=_FMT,
                              help="suggest an Adam learning rate from λ_max (2/λ_max stability bound)",
                              description="Measures λ_max and the gradient scale, suggests "
                              "lr = calibration * grad_rms * 2/λ_max and a range. Writes suggest_lr.json.")
    _model_args(p, "runs/analysis")
    _power_args(p)
    p.add_argument("--calibration", type=positive_float, default=ADAM_CALIBRATION,
                   help="Adam calibration factor (see randmask_lab.analysis.suggest_lr)")
    p.set_defaults(func=_cmd_suggest_lr, command="suggest-lr")


def _add_activations(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``activations`` sub-command."""
    p = subparsers.add_parser("activations", formatter_class=_FMT,
                              help="RMS of each input feature of linear layers (outlier hidden dimensions)",
                              description="Runs the training batches through the model and reports, per layer, "
                              "the input features with the largest RMS over real tokens, as multiples of the "
                              "median feature. A masked entry on such a feature lies on a steep Hessian "
                              "direction. Writes activations.json.")
    _model_args(p, "runs/analysis")
    p.add_argument("--modules", nargs="+", help="module name suffixes (e.g. v_proj); default: the masked layers")
    p.add_argument("--features", nargs="+", type=non_negative_int, default=[],
                   help="input features to rank in every layer")
    p.add_argument("--top", type=positive_int, default=3, help="largest features to list per layer")
    p.set_defaults(func=_cmd_activations, command="activations")


def _add_figure4(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``figure4`` sub-command."""
    p = subparsers.add_parser("figure4", formatter_class=_FMT,
                              help="paper Fig. 4 (λ_max before/after, distance vs budget) from analysis outputs",
                              description="Reads every hessian.json / suggest_lr.json / distance.json under the "
                              "folders, prints a table and writes lambda_max.png and distance.png.")
    p.add_argument("folders", nargs="+", type=Path, help="folders holding the analysis commands' outputs")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="output directory")
    p.set_defaults(func=_cmd_figure4, command="figure4")
