"""randmask_lab: the experimental system built on the randmask library.

The paper's tasks and protocol (``tasks``), the baselines behind one method interface
(``methods``), the runner, results store, sweeps and reports (``experiment``), the Hessian and
distance analysis (``analysis``), the linear-regression theory simulator (``theory``), the offline
model zoo (``zoo``) and the ``randmask`` command (``cli``). It uses the library only through
``randmask.__all__`` (and the ``__all__`` of ``randmask.targets`` / ``randmask.ops``).

Why a second top-level package: ``import randmask`` must stay torch + safetensors only, as
torchtune keeps its recipes apart from its library. Installed by ``pip install 'randmask[lab]'``.
"""

from randmask import __version__

__all__ = ["__version__"]
