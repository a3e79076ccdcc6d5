"""The loop's evaluation: ``predict`` (per-item losses and predictions) and ``evaluate`` (their mean and metric)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from randmask_lab.experiment.compute.distributed import DistContext
from randmask_lab.experiment.compute.precision import PrecisionPlan
from randmask_lab.experiment.parts.data import LMItem
from randmask_lab.experiment.parts.lm import LMObjective
from randmask_lab.experiment.training.loop import evaluate, predict
from randmask_lab.tasks import get_task


def test_evaluate_is_the_mean_loss_and_the_metric_of_predict(tiny_lm):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_lm)
    objective = LMObjective(get_task("rte"), tf.AutoTokenizer.from_pretrained(tiny_lm), 0)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: tuple(torch.randint(3, 200, (n,), generator=g).tolist())  # noqa: E731
    items = [LMItem(rand(6 + i), (rand(1), rand(2)), rand(1), i % 2, ()) for i in range(5)]
    plan, ctx = PrecisionPlan("32", torch.device("cpu")), DistContext()
    losses, preds = predict(model, objective, plan, ctx, items, with_metric=True)
    assert len(losses) == len(preds) == len(items) and set(preds) <= {0, 1}
    loss, metric = evaluate(model, objective, plan, ctx, items, with_metric=True)
    assert loss == pytest.approx(sum(losses) / len(losses))
    assert metric == pytest.approx(sum(p == x.gold for p, x in zip(preds, items)) / len(items))
