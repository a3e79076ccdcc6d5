"""How many entries a masking trains: per-matrix budgets, the achieved fraction of the base model, and PEFT's
``print_trainable_parameters`` one-liner."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from randmask.adapter import MaskAdapter
from randmask.layer import logical_shape
from randmask.quantized import logical_numel
from randmask.registry import adapter_meta, masked_layers


@dataclass
class MatrixBudget:
    """Budget of one masked matrix (a module, or one column block of a fused one)."""

    name: str
    shape: tuple[int, int]  # logical (out, in) of the matrix or block
    nnz: int

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])


@dataclass
class MaskingSummary:
    """Per-matrix trainable counts and the achieved fraction of all base-model parameters."""

    adapter_name: str
    total_params: int
    matrices: list[MatrixBudget]

    @property
    def trainable(self) -> int:
        return sum(m.nnz for m in self.matrices)

    @property
    def ratio(self) -> float:
        return self.trainable / self.total_params

    def __str__(self) -> str:
        lines = [f"randmask adapter {self.adapter_name!r}: {self.trainable:,} trainable of "
                 f"{self.total_params:,} parameters ({100 * self.ratio:.5f}%) in {len(self.matrices)} matrices"]
        lines += [f"  {m.name:<60} {m.shape[0]}x{m.shape[1]:<8} nnz={m.nnz:<9} p={m.density:.3g}"
                  for m in self.matrices]
        return "\n".join(lines)



def count_base_parameters(model: nn.Module) -> int:
    """Number of model parameters, not counting randmask's own ``values`` (shared ones once).

    A packed 4-bit weight counts its (out x in) entries, so a model and its quantized copy have the same
    count, hence the same budget and the same masks."""
    adapter_params = {id(m.values) for m in model.modules() if isinstance(m, MaskAdapter)}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in adapter_params:
            seen.add(id(p))
            total += logical_numel(p)
    return total



def masking_summary(model: nn.Module, adapter_name: str = "default") -> MaskingSummary:
    """Per-matrix nnz and the achieved ratio of all base-model parameters."""
    total = adapter_meta(model, adapter_name)["total_params"]
    matrices = []
    for name, layer in masked_layers(model).items():
        if adapter_name not in layer.adapters:
            continue
        in_f = logical_shape(layer.base_layer)[1]
        for block in layer.adapters[adapter_name].blocks:
            label = f"{name}[{block.name}]" if block.name else name
            matrices.append(MatrixBudget(label, (block.stop - block.start, in_f), block.nnz))
    return MaskingSummary(adapter_name, total, matrices)


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT-style one-liner: trainable params, all params, trainable %."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_base_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.6f}")


__all__ = ["MaskingSummary", "MatrixBudget", "count_base_parameters", "masking_summary", "print_trainable_parameters"]
