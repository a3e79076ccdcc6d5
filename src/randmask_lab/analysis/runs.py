"""The analysis commands' logic on a model in hand (for notebooks, tests and the CLI's handlers): the Hessian's top
eigenvalue(s), the distance from the pretrained weights, an LR suggestion, and the activations' outliers. Each writes
its JSON (and figures) into an output folder and returns the summary it wrote."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randmask import count_base_parameters, masked_layers
from randmask_lab.analysis.distance import distance_from, masked_distance, merge_peft_delta
from randmask_lab.analysis.hessian import hessian_top_eigenvalue, hessian_top_eigenvalues_with_bounds
from randmask_lab.analysis.hvp import LossFn
from randmask_lab.analysis.localization import eigenvector_localization
from randmask_lab.analysis.suggest_lr import ADAM_CALIBRATION, suggest_lr
from randmask_lab.fs import write_json


def _n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _run_meta(model: nn.Module, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``meta`` plus the trainable and total (base model) parameter counts."""
    return {**(meta or {}), "n_trainable": _n_trainable(model), "n_total": count_base_parameters(model)}


def _write_strict(path: Path, summary: dict) -> str:
    """Write ``summary`` as strict JSON: ``write_json`` would write NaN/Infinity, which no strict reader (figure4,
    loads_strict) accepts, so a non-finite number is a ValueError naming it instead of a damaged file."""
    try:
        return str(write_json(path, summary, indent=2, allow_nan=False))
    except ValueError:
        raise ValueError(f"{path.name} would hold non-finite numbers (inf/nan): the weights or the loss are not "
                         "finite; check the run's trained weights (and --reference)") from None


def run_hessian(model: nn.Module, batches: Sequence[Any], out_dir: str | Path, *,
                loss_fn: LossFn | None = None, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                which: str = "top", top_k: int = 0, lanczos_steps: int | None = None,
                meta: Mapping[str, Any] | None = None) -> dict:
    """λ_max by power iteration (+ the top-k by Lanczos if ``top_k``); writes hessian.json, power_trace.png.

    ``meta``: what was measured (model, task, method, budget, trained or not), stored as ``run`` in the JSON
    together with the parameter counts, so that ``randmask figure4`` can place the result.
    """
    out = Path(out_dir)
    res = hessian_top_eigenvalue(model, batches, loss_fn, tol=tol, max_iter=max_iter, seed=seed,
                                 which=which)  # type: ignore[arg-type]
    summary: dict = {
        "lambda_max": res.eigenvalue, "which": which, "converged": res.converged,
        "iterations": res.iterations, "largest_magnitude": res.largest_magnitude,
        "shifted": res.shifted, "residual": res.residual, "trace": res.trace,
        "n_trainable": _n_trainable(model), "n_batches": len(batches),
        "settings": {"tol": tol, "max_iter": max_iter, "seed": seed}, "run": _run_meta(model, meta),
    }
    if res.vector is not None:
        summary["localization"] = eigenvector_localization(model, res.vector)
    if top_k:
        # Each value's residual bound beside it: past the first two, 20 Lanczos steps left them ~5% low, unseen.
        summary["top_k"], summary["top_k_error_bounds"] = hessian_top_eigenvalues_with_bounds(
            model, batches, top_k, loss_fn, steps=lanczos_steps, seed=seed)
        summary["lanczos_steps"] = lanczos_steps
    from randmask_lab.analysis.plots import plot_power_trace  # matplotlib only when a plot is drawn

    plot = plot_power_trace(res.trace, out / "power_trace.png", tol=tol)
    summary["files"] = {"plot": str(plot)}
    summary["files"]["json"] = _write_strict(out / "hessian.json", summary)
    return summary


def run_distance(model: nn.Module, out_dir: str | Path,
                 reference_state_dict: Mapping[str, torch.Tensor] | None = None,
                 meta: Mapping[str, Any] | None = None) -> dict:
    """Distance from the pretrained weights; writes distance.json.

    With a reference state dict: ``distance_from`` (any method; a peft LoRA delta is merged into the
    weights first, consuming ``model``); without one, a randmask model's ``values`` (``masked_distance``).
    """
    run = _run_meta(model, meta)  # the counts before a LoRA merge turns the model into plain weights
    if reference_state_dict is not None:
        model, merged = merge_peft_delta(model)
        # Only what the method trains: a head held fixed (--freeze-head) moved in training but is not the method's.
        report = distance_from(model, reference_state_dict, trainable_only=True, also=merged)
        how = "weights vs reference state dict" + (" (LoRA delta merged)" if merged else "")
    elif masked_layers(model):
        report, how = masked_distance(model), "norm of randmask values"
    else:
        raise ValueError("this model has no randmask layers: pass --reference PRETRAINED_WEIGHTS "
                         "(.safetensors or a torch state dict) to compare its weights with.")
    summary = {"method": how, **report.to_dict(), "run": run}
    summary["files"] = {"json": _write_strict(Path(out_dir) / "distance.json", summary)}
    return summary


def run_suggest_lr(model: nn.Module, batches: Sequence[Any], out_dir: str | Path, *,
                   loss_fn: LossFn | None = None, calibration: float = ADAM_CALIBRATION,
                   tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                   meta: Mapping[str, Any] | None = None) -> dict:
    """Adam LR suggestion from λ_max; writes suggest_lr.json."""
    sugg = suggest_lr(model, batches, loss_fn, calibration=calibration, tol=tol, max_iter=max_iter, seed=seed)
    summary = {**sugg.to_dict(), "formula": "adam_lr = calibration * grad_rms * 2 / lambda_max",
               "run": _run_meta(model, meta)}
    summary["files"] = {"json": _write_strict(Path(out_dir) / "suggest_lr.json", summary)}
    return summary


def run_activations(model: nn.Module, batches: Sequence[Any], out_dir: str | Path, *,
                    loss_fn: LossFn | None = None, modules: Sequence[str] | None = None, features: Sequence[int] = (),
                    top: int = 3, meta: Mapping[str, Any] | None = None) -> dict:
    """RMS of each input feature of ``modules`` (name suffixes; default: the masked layers) over the batches'
    real tokens, with each module's outliers; writes activations.json (summary plus every RMS vector)."""
    from randmask_lab.analysis.activations import feature_outliers, input_feature_rms, matching_modules

    if modules:
        names = matching_modules(model, modules)
    else:
        names = list(masked_layers(model))
        if not names:
            raise ValueError("this model has no randmask layers: pass --modules (e.g. v_proj) to name the "
                             "linear layers whose inputs to measure")
    rms = input_feature_rms(model, batches, names, loss_fn)
    summary = {"modules": feature_outliers(rms, top=top, features=features), "n_batches": len(batches),
               "run": _run_meta(model, meta), "rms": {n: r.tolist() for n, r in rms.items()}}
    summary["files"] = {"json": _write_strict(Path(out_dir) / "activations.json", summary)}
    return summary


def activations_markdown(summary: dict, features: Sequence[int] = ()) -> str:
    """One row per module: its median input RMS, its top features (× the median) and the asked features."""
    head = "| module | median RMS | largest input features (× median) |" + "".join(
        f" feature {f}: rank, × median |" for f in features)
    lines = [head, "|---|---:|---|" + "---|" * len(features)]
    def times(x: float | None) -> str:  # None: the module's median RMS is 0 (feature_outliers)
        return "-" if x is None else f"{x:.1f}×"

    for name, row in summary["modules"].items():
        top = ", ".join(f"{t['feature']} ({times(t['x_median'])})" for t in row["top"])
        asked = "".join(f" {row['features'][str(f)]['rank'] + 1}, {times(row['features'][str(f)]['x_median'])} |"
                        for f in features)
        lines.append(f"| {name} | {row['median_rms']:.3g} | {top} |{asked}")
    return "\n".join(lines)


__all__ = ["activations_markdown", "run_activations", "run_distance", "run_hessian", "run_suggest_lr"]
