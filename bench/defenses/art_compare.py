"""Our AC, SS and STRIP against IBM ART 1.20.1's, on the same model, data and forward path.

Both sides query the very same :class:`~harness.runtime.adapter.RuntimeAdapter` (one ORT thread):
ART
through :class:`AdapterClassifier`, a minimal ``BlackBoxClassifier`` whose ``predict`` is the
adapter's softmax and whose ``get_activations`` is the adapter's penultimate probe. So the
forward passes cost the same on both sides and the comparison measures the defenses'
algorithms; the time spent inside ``InferenceSession.run`` is reported separately, as is the
rest ("algorithm" time). Data: the grid's GTSRB BadNet setup (see :mod:`bench.defenses.bench_defenses`).

Pairs compared (ART's own defaults otherwise):

- AC: ours (FastICA, 2-means with 50 restarts, size < 0.35 and silhouette > 0.10 per class)
  vs ``ActivationDefence.detect_poison(nb_clusters=2, nb_dims=10, reduce="FastICA",
  cluster_analysis="smaller")`` — and the same with PCA. ART's "smaller" marks the smaller
  cluster of *every* class as poison, so its precision is low by design.
- SS: ours vs ``SpectralSignatureDefense(expected_pp_poison=ε, eps_multiplier=1.5)`` with ε the
  attack's poison rate (ours takes the same ε from ``DefenseData.poison_rate``). Both remove the
  top 1.5·ε of each class; ART scores ``|v·r|`` on *uncentred* features, ours ``(v·(r-μ))²``.
- STRIP: ours (100 overlays, saturated-sum blend, threshold fitted on half of the tested clean
  inputs) vs ART's ``STRIP(classifier)(num_samples=100, false_acceptance_rate=0.01)``:
  ``mitigate`` on the same clean half ours fits on, then ``predict`` on the same held-out clean
  half and triggered inputs (abstentions = flagged). ART averages blends (α = 0.5), takes its
  overlays from ``mitigate``'s validation set, and computes ``scipy.stats.entropy(..., axis=0)``
  over the overlay axis — all its own choices, kept as shipped.

ART draws from the global ``np.random`` (sklearn with ``random_state=None``, STRIP's overlay
picks), so the global generator is seeded before each ART run; it is the only way to make a
third-party library that offers no seed repeatable.

Setup, once: ``.venv/bin/pip install --target /tmp/art-bench --no-deps
adversarial-robustness-toolbox==1.20.1 six`` (ART's other requirements — numpy, scipy,
scikit-learn, setuptools, tqdm — are in the venv). Usage: ``PYTHONPATH=/tmp/art-bench
python -m bench.defenses.art_compare [--quick] [--precisions fp32,int8-static] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.defenses.bench_defenses import (
    DEFAULT_DATA,
    SEED,
    Budget,
    artifact_path,
    default_artifacts,
    environment,
    gtsrb_defense_data,
    ort_run_time,
    single_thread_everything,
)

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's STRIP.mitigate draws a progress bar

try:
    import art
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.defences.transformer.poisoning import STRIP
    from art.estimators.classification import BlackBoxClassifier
except ImportError as exc:  # pragma: no cover - only importable where ART is installed
    raise SystemExit(
        f"bench.defenses.art_compare needs adversarial-robustness-toolbox 1.20.1 ({exc}); install it with "
        "`.venv/bin/pip install --target /tmp/art-bench --no-deps "
        "adversarial-robustness-toolbox==1.20.1 six` and run with PYTHONPATH=/tmp/art-bench"
    ) from None

TARGET_SPEEDUP = 3.0
LAYER = "penultimate"


class AdapterClassifier(BlackBoxClassifier):
    """ART's view of our adapter: softmax predictions and penultimate activations, nothing else.

    ``get_activations`` ignores ART's ``batch_size``: the adapter batches exactly as it does
    for our defenses, which is what keeps the forward cost identical on both sides.
    """

    def __init__(self, adapter: Any) -> None:
        super().__init__(
            predict_fn=self._probabilities,
            input_shape=tuple(adapter.input_shape),
            nb_classes=adapter.num_classes,
            clip_values=(0.0, 255.0),
        )
        self._adapter = adapter

    def predict(self, x: np.ndarray, batch_size: int = 128, **kwargs: Any) -> np.ndarray:
        """The adapter's softmax, without ``BlackBoxClassifier.predict``'s detour through
        ``self.predict_fn``: ART's STRIP swaps the instance's class for one whose ``predict_fn``
        *is* this ``predict``, and that detour then recurses forever (RecursionError)."""
        return self._probabilities(x)

    def _probabilities(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.uint8:  # ART blends in float64; ORT takes float32
            x = x.astype(np.float32)
        return self._adapter.probabilities(x)

    @property
    def layer_names(self) -> list[str]:
        return [LAYER]

    def get_activations(
        self, x: np.ndarray, layer: int | str, batch_size: int = 128, framework: bool = False
    ) -> np.ndarray:
        return self._adapter.activations(np.asarray(x), [LAYER])[LAYER]


# ---------------------------------------------------------------------------------- one side
@dataclass
class Side:
    """One implementation's run: wall time, time inside ORT, and outcome."""

    wall_s: float
    ort_s: float
    quality: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def algorithm_s(self) -> float:
        return self.wall_s - self.ort_s


def timed(fn: Callable[[], dict[str, float]]) -> Side:
    """Run ``fn`` under the ORT timer; it returns the outcome numbers. A failure is recorded
    (ART's AC, for one, raises on a class with fewer samples than ``nb_dims``), not raised."""
    error = None
    quality: dict[str, float] = {}
    with ort_run_time() as spent:
        started = time.perf_counter()
        try:
            quality = fn()
        except Exception as exc:  # reported in the table: a failure is a result here
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        wall = time.perf_counter() - started
    return Side(wall_s=wall, ort_s=spent[0], quality=quality, error=error)


def filter_quality(flagged: np.ndarray, poison_mask: np.ndarray) -> dict[str, float]:
    """Precision / recall of flagged training samples against the poison ground truth."""
    from defenses.filtering import sample_filter_metrics

    metrics = sample_filter_metrics(np.asarray(flagged, dtype=bool), poison_mask)
    return {
        "flagged": metrics["n_flagged"],
        "precision": metrics["poison_precision"],
        "recall": metrics["poison_recall"],
    }


def ours(name: str, params: dict[str, Any], adapter: Any, data: Any) -> Side:
    """Our defense, seeded as the runner seeds it."""
    from harness.pipeline.evaluate import run_defense

    def go() -> dict[str, float]:
        result = run_defense(name, params, SEED, adapter, data)
        if result.status != "ok":
            raise RuntimeError(f"our {name} did not run: {result.status} {result.reason}")
        if name == "strip":
            return {k: result.scores[k] for k in ("tpr", "frr", "auroc")}
        flagged = result.arrays["flagged" if name == "activation_clustering" else "removed"]
        return filter_quality(flagged, data.poison_mask)

    return timed(go)


def art_activation_clustering(adapter: Any, data: Any, reduce: str) -> Side:
    def go() -> dict[str, float]:
        np.random.seed(SEED)  # ART's KMeans/FastICA use the global generator
        defence = ActivationDefence(AdapterClassifier(adapter), data.train_x, data.train_y)
        _, is_clean = defence.detect_poison(
            nb_clusters=2, nb_dims=10, reduce=reduce, cluster_analysis="smaller"
        )
        return filter_quality(np.asarray(is_clean) == 0, data.poison_mask)

    return timed(go)


def art_spectral_signatures(adapter: Any, data: Any) -> Side:
    def go() -> dict[str, float]:
        defence = SpectralSignatureDefense(
            AdapterClassifier(adapter),
            data.train_x,
            data.train_y,
            expected_pp_poison=data.poison_rate,
            batch_size=256,
            eps_multiplier=1.5,
        )
        _, is_clean = defence.detect_poison()
        return filter_quality(np.asarray(is_clean) == 0, data.poison_mask)

    return timed(go)


def strip_split(
    data: Any, n_test: int, seed_parts: tuple[object, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clean-fit, clean-eval and triggered inputs our STRIP tests, drawn as it draws them
    (``Strip._run``'s first two draws from the same seeded generator)."""
    from harness.core.sampling import stable_seed

    rng = np.random.default_rng(stable_seed(*seed_parts))
    n_clean = min(n_test, len(data.clean_x) // 2)
    order = rng.permutation(len(data.clean_x))
    tested = data.clean_x[order[:n_clean]]
    picked = rng.choice(
        len(data.triggered_x), size=min(n_test, len(data.triggered_x)), replace=False
    )
    n_fit = (n_clean + 1) // 2
    return tested[:n_fit], tested[n_fit:], data.triggered_x[np.sort(picked)]


def art_strip(adapter: Any, data: Any, n_test: int, n_overlays: int) -> Side:
    fit, clean_eval, triggered = strip_split(data, n_test, ("defense", "strip", SEED))

    def go() -> dict[str, float]:
        np.random.seed(SEED)  # ART's overlay picks use the global generator
        defended = STRIP(AdapterClassifier(adapter))(
            num_samples=n_overlays, false_acceptance_rate=0.01
        )
        defended.mitigate(fit)
        abstained = [
            ~defended.predict(x).any(axis=1)  # an abstention is an all-zero row
            for x in (clean_eval, triggered)
        ]
        return {"tpr": float(abstained[1].mean()), "frr": float(abstained[0].mean())}

    return timed(go)


# ---------------------------------------------------------------------------------- comparison
@dataclass
class Pair:
    defense: str
    precision: str
    ours: Side
    art: Side

    @property
    def speedup(self) -> float:
        if self.art.error or self.ours.error:
            return float("nan")
        return self.art.wall_s / self.ours.wall_s

    @property
    def algorithm_speedup(self) -> float:
        if self.art.error or self.ours.error:
            return float("nan")
        return self.art.algorithm_s / max(self.ours.algorithm_s, 1e-9)


def compare_precision(precision: str, artifacts: Path, data: Any, budget: Budget) -> list[Pair]:
    from harness.runtime.adapter import RuntimeAdapter

    adapter = RuntimeAdapter.from_path(artifact_path(artifacts, precision), threads=1)
    adapter.activations(data.clean_x[:1])  # build the probe session outside every timing
    n_overlays = 100
    strip_params = {"n_test": budget.strip_n_test, "n_overlays": n_overlays}
    return [
        Pair(
            "AC (FastICA)",
            precision,
            ours("activation_clustering", {"reduction": "ica"}, adapter, data),
            art_activation_clustering(adapter, data, "FastICA"),
        ),
        Pair(
            "AC (PCA)",
            precision,
            ours("activation_clustering", {"reduction": "pca"}, adapter, data),
            art_activation_clustering(adapter, data, "PCA"),
        ),
        Pair(
            "SS",
            precision,
            ours("spectral_signatures", {}, adapter, data),
            art_spectral_signatures(adapter, data),
        ),
        Pair(
            "STRIP",
            precision,
            ours("strip", strip_params, adapter, data),
            art_strip(adapter, data, budget.strip_n_test, n_overlays),
        ),
    ]


def _quality(side: Side) -> str:
    if side.error:
        return f"failed: {side.error}"
    return ", ".join(
        f"{k}={v:.0f}" if k == "flagged" else f"{k}={v:.3f}" for k, v in side.quality.items()
    )


def markdown(pairs: list[Pair], budget: Budget) -> str:
    lines = [
        f"### Ours vs ART {art.__version__} (same adapter, 1 thread; target ≥ "
        f"{TARGET_SPEEDUP:.0f}× faster)",
        "",
        f"AC/SS on {budget.train_size} poisoned training images; STRIP on "
        f"{budget.strip_n_test} clean + {budget.strip_n_test} triggered inputs, 100 overlays.",
        "",
        "| defense | precision | ours s (ORT s) | ART s (ORT s) | ART/ours wall | "
        "ART/ours algorithm | ≥3× | ours | ART |",
        "|---|---|---:|---:|---:|---:|:-:|---|---|",
    ]
    for p in pairs:
        ok = "yes" if p.speedup >= TARGET_SPEEDUP else "no"
        lines.append(
            f"| {p.defense} | {p.precision} | {p.ours.wall_s:.2f} ({p.ours.ort_s:.2f}) | "
            f"{p.art.wall_s:.2f} ({p.art.ort_s:.2f}) | {p.speedup:.2f} | "
            f"{p.algorithm_speedup:.2f} | {ok} | {_quality(p.ours)} | {_quality(p.art)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, help="default: the model under runs/gtsrb")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--precisions", default="fp32,int8-static")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.artifacts = args.artifacts or default_artifacts()

    single_thread_everything()
    # ART's FastICA warns for every class that does not converge; ours records that per class
    warnings.filterwarnings("ignore", message="FastICA did not converge")
    budget = Budget.quick() if args.quick else Budget()
    started = time.perf_counter()
    data = gtsrb_defense_data(args.data, budget.train_size)
    pairs: list[Pair] = []
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        pairs += compare_precision(precision, args.artifacts, data, budget)
        print(f"[{time.perf_counter() - started:6.1f}s] {precision} done", flush=True)
    print()
    print(markdown(pairs, budget))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "art": art.__version__,
                    "budget": asdict(budget),
                    "environment": environment(),
                    "pairs": [
                        {
                            "defense": p.defense,
                            "precision": p.precision,
                            "ours": asdict(p.ours),
                            "art": asdict(p.art),
                            "speedup": p.speedup,
                            "algorithm_speedup": p.algorithm_speedup,
                        }
                        for p in pairs
                    ],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
