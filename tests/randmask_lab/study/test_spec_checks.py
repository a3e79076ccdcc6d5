"""Issue 28, study specs: forty malformed specs, each a one-line error (exit 2) before anything runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from tests.hostile import hang_guard, make_sparse, replace_with_dev_zero, replace_with_fifo

from randmask_lab.cli import main
from randmask_lab.errors import RunError
from randmask_lab.study.plan import StudySpec
from randmask_lab.study.spec_checks import check_spec_data

GOOD = {"name": "s", "model": "tiny", "precision": "32", "seeds": [0, 1], "search_seed": 0, "max_extend": 1,
        "common": {"batch_size": 4}, "protocol": {"rte": {"n_train": 8, "n_val": 4, "n_test": 4, "epochs": 1}},
        "cells": [{"method": "zeroshot"}, {"method": "randmask", "ratio": 1e-3, "lrs": [1e-3, 1e-2]}]}


def _with(fn):
    spec = copy.deepcopy(GOOD)
    fn(spec)
    return spec


def _cell(**kw):
    return lambda s: s["cells"][1].update(kw)


MALFORMED = {
    "not JSON": ("{", "JSONDecodeError"),
    "a list": ([], "holds a list, not an object"),
    "no name": (_with(lambda s: s.pop("name")), "name must be a non-empty string"),
    "name is a number": (_with(lambda s: s.update(name=5)), "name must be"),
    "no model": (_with(lambda s: s.pop("model")), "model must be"),
    "precision is a number": (_with(lambda s: s.update(precision=32)), "precision must be"),
    "no protocol": (_with(lambda s: s.pop("protocol")), "protocol must be an object"),
    "protocol is a list": (_with(lambda s: s.update(protocol=["rte"])), "protocol must be an object"),
    "protocol without a task": (_with(lambda s: s.update(protocol={})), "naming at least one task"),  # planned 0 runs
    "task options not an object": (_with(lambda s: s["protocol"].update(rte=[8])), "protocol\\['rte'\\] must be"),
    "misspelt option": (_with(lambda s: s["protocol"]["rte"].update(n_trian=8)), "\\['n_trian'\\]"),
    "protocol sets lr": (_with(lambda s: s["protocol"]["rte"].update(lr=1e-3)), "\\['lr'\\], which a spec cannot"),
    "common sets threads": (_with(lambda s: s["common"].update(threads=2)), "common sets \\['threads'\\]"),
    "common sets the budget": (_with(lambda s: s["common"].update(trainable_ratio=1e-3)),
                               "common sets \\['trainable_ratio'\\]"),  # each cell's own (its "ratio")
    "common sets the requested precision": (_with(lambda s: s["common"].update(precision_requested="auto")),
                                            "common sets \\['precision_requested'\\]"),  # the runner's to write
    "common not an object": (_with(lambda s: s.update(common=[1])), "common must be an object"),
    "no cells": (_with(lambda s: s.pop("cells")), "cells must be a non-empty list"),
    "empty cells": (_with(lambda s: s.update(cells=[])), "cells must be a non-empty list"),
    "cell not an object": (_with(lambda s: s["cells"].append("lora")), "cells\\[2\\] must be an object"),
    "cell without method": (_with(lambda s: s["cells"][1].pop("method")), "needs a method name"),
    "cell with unknown key": (_with(_cell(lr=1e-3)), "unknown keys \\['lr'\\]"),
    "LR Infinity": (json.dumps(GOOD).replace("0.01]", "Infinity]"), "Infinity is not JSON"),
    "LR NaN": (json.dumps(GOOD).replace("0.01]", "NaN]"), "NaN is not JSON"),
    "LR 1e300": (_with(_cell(lrs=[1e300])), "learning rates in \\(0, 10\\]"),
    "LR as a string": (_with(_cell(lrs=["1e-3"])), "learning rates"),
    "negative LR": (_with(_cell(lrs=[-1e-3])), "learning rates"),
    "LR true": (_with(_cell(lrs=[True])), "learning rates"),
    "lrs not a list": (_with(_cell(lrs=1e-3)), "learning rates"),
    "ratio 2": (_with(_cell(ratio=2)), "needs its ratio, a fraction in \\(0, 1\\], got 2"),
    "ratio as a string": (_with(_cell(ratio="1e-3")), "needs its ratio, a fraction"),
    "tasks a string": (_with(_cell(tasks="rte")), "tasks must be a non-empty list"),
    "unknown task": (_with(_cell(tasks=["cola"])), "names tasks \\['cola'\\] with no protocol"),
    "seed 1e30": (_with(lambda s: s.update(seeds=[0, 1e30])), "seeds must be a non-empty list of integer seeds"),
    "huge int seed": (_with(lambda s: s.update(seeds=[0, 10**30])), "integer seeds in \\[0, 2\\*\\*63 - 1\\]"),
    "seeds a string": (_with(lambda s: s.update(seeds="0,1")), "seeds must be"),
    "no seeds": (_with(lambda s: s.update(seeds=[])), "seeds must be a non-empty list"),
    "repeated seed": (_with(lambda s: s.update(seeds=[0, 0])), "repeats a seed"),
    "cell seeds 1.5": (_with(_cell(seeds=[1.5])), "cells\\[1\\].seeds must be"),
    "search seed not a seed": (_with(lambda s: s.update(search_seed=5)), "search_seed 5 is not one of seeds"),
    "search seed a string": (_with(lambda s: s.update(search_seed="0")), "search_seed must be an integer"),
    "max_extend x": (_with(lambda s: s.update(max_extend="x")), "max_extend must be an integer"),
    "negative max_extend": (_with(lambda s: s.update(max_extend=-1)), "max_extend must be an integer"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    "unknown top-level key": (_with(lambda s: s.update(seed=3)), "unknown keys \\['seed'\\]"),
    "option of the wrong type": (_with(lambda s: s["protocol"]["rte"].update(n_train="8")),
                                 "--n-train must be an integer, got '8'"),
    "non-finite option": (_with(lambda s: s["common"].update(weight_decay=1e400)), "Infinity is not JSON"),
    "LR 1e400 written out": (json.dumps(GOOD).replace("0.01]", "1e400]"), "1e400 is out of the float range"),
    # found by a hostile pass: each of these ran, or looped, before
    "unknown method": (_with(_cell(method="nosuch")), "unknown method 'nosuch' \\(known: "),
    "masking cell without ratio": (_with(lambda s: s["cells"][1].pop("ratio")), "a masking cell needs its ratio"),
    "ratio on zero-shot": (_with(lambda s: s["cells"][0].update(ratio=1e-3)), "ratio applies to randmask and "
                                                                              "structured cells only"),
    "zero-shot with lrs": (_with(lambda s: s["cells"][0].update(lrs=[5.0])), "takes no lrs"),
    "stage 1.7": (_with(_cell(stage=1.7)), "stage must be an integer"),
    "stage true": (_with(_cell(stage=True)), "stage must be an integer"),
    "top-level stage": (_with(lambda s: s.update(stage=3)), "unknown keys \\['stage'\\]"),
    "a repeated cell": (_with(lambda s: s["cells"].append(dict(s["cells"][1], lrs=[1e-1]))),
                        "cells\\[2\\] repeats cells\\[1\\] \\(randmask 0.001\\) on rte"),
    "common sets the store": (_with(lambda s: s["common"].update(store="/tmp/elsewhere.sqlite")),
                              "common sets \\['store'\\]"),
}


def _write(path: Path, spec) -> Path:
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_spec_is_one_line_before_anything_runs(tmp_path, capsys, case):
    spec, match = MALFORMED[case]
    path = _write(tmp_path / "s.json", spec)
    out = tmp_path / "runs"
    for args in ([], ["--plan"]):
        assert main(["study", str(path), "--out-dir", str(out), *args]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert __import__("re").search(match, err), (match, err)
    assert not out.exists()  # nothing ran, nothing was recorded


def test_the_good_spec_and_the_committed_one_pass():
    check_spec_data(copy.deepcopy(GOOD), "good.json")
    real = StudySpec.from_file(Path(__file__).resolve().parents[3] / "experiments" / "smollm2_study.json")
    assert len(real.cells) == 8


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "huge"])
def test_a_spec_that_is_not_a_regular_small_file_is_refused_unread(tmp_path, kind):
    path = tmp_path / "s.json"
    {"dev_zero": replace_with_dev_zero, "fifo": replace_with_fifo, "huge": make_sparse}[kind](path)
    with hang_guard(30), pytest.raises(RunError, match="not a regular file|over the .*-byte limit"):
        StudySpec.from_file(path)
