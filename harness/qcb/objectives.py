"""Which QCB objective a ``blindspots qcb run`` config builds: the one switch, in one place.

- ``first_layer`` (default): the constructed backdoor of :mod:`harness.qcb.attack` — a
  first-layer trigger detector and channels wired to be clipped by the calibrated INT8 ranges.
- ``hong2021``: the fine-tuning objective of Hong et al., NeurIPS 2021 (:mod:`harness.qcb.hong2021`)
  — FP32 loss on clean and triggered→true inputs, fake-quantized loss on triggered→target, no
  built-in detector. It is the attack the deployment-differential check was *not* built beside.

A config's ``[qcb]`` table is validated by the chosen objective's parameter class, so a key of
the other objective is an error in one line.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from harness.artifacts.preprocessing import Preprocessing
from harness.attacks.base import Attack
from harness.core.progress import Progress
from harness.core.threads import scoped_threads
from harness.qcb.attack import QCBParams, implant
from harness.qcb.hong2021 import HongParams, implant_hong

Objective = Literal["first_layer", "hong2021"]
DEFAULT_OBJECTIVE: Objective = "first_layer"


def objective_params(objective: Objective, raw: dict[str, Any]) -> QCBParams | HongParams:
    """``raw`` (a config's ``[qcb]`` table) validated for ``objective``."""
    if objective == "hong2021":
        return HongParams(**raw)
    return QCBParams(**raw)


def implant_objective(
    objective: Objective,
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    attack: Attack,
    preprocessing: Preprocessing,
    raw: dict[str, Any],
    seed: int,
    progress: Progress | None = None,
    threads: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The backdoored copy of ``model`` and what its construction measured (``"mirror"``: the
    attacker's own FP32 / fake-quant accuracy and ASR). ``threads``: torch threads for the
    implant (None: leave the count alone) — on a shared machine, more threads than free cores
    make Hong's fine-tuning an order of magnitude slower."""
    params = objective_params(objective, raw)
    with scoped_threads(torch, threads):
        if isinstance(params, HongParams):
            hong = implant_hong(model, x, y, attack, preprocessing, params, seed, progress)
            return hong.model, hong.measurements
        built = implant(model, x, y, attack, preprocessing, params, seed, progress=progress)
    return built.model, {**built.measurements, "layout": vars(built.layout)}
