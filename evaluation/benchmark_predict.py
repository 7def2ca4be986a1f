"""What `fedseg predict` costs on one BraTS-sized case: 240 x 240 x 155 at 1 mm, four modalities.

Run as ``python -m evaluation.benchmark predict --out DIR [--repeats 2] [--preset brats]``.
A generated case (``fedseg.synth``) is resampled onto BraTS's 240 x 240 x 155 1 mm grid and
written as a BraTS 2023 case folder; then, side by side in one process, each ``--repeats``
times:

- ``predict``: :func:`fedseg.task.predict.predict_case` with the preset's network at its
  study patch size (harmonise at 1 mm, sliding window, back to the scan's grid, write);
- ``predict_mirror``: the same with the eight-way test-time mirroring.

The network is the preset at its seeded initialisation: what it predicts does not change
what it costs. ``DIR/benchmark_predict.json`` holds the medians per stage, the canonical grid
the network saw, the device and thread count, and the ratio mirror / plain.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from data_adapters.harmonise import harmonisation_parameters
from data_adapters.writers import write_nifti
from fedseg.config import RunConfig
from fedseg.synth import generate_federation
from fedseg.task.artifact import load_artifact
from fedseg.task.device import resolve_device
from fedseg.task.predict import PredictOptions, find_case, predict_case

BRATS_SHAPE = (240, 240, 155)
PATCH = {"brats": 128, "tiny": 48}


def brats_sized_case(out: Path, *, seed: int) -> Path:
    """A generated case on a 240 x 240 x 155 1 mm grid (LPS like BraTS's files), as a
    BraTS 2023 case folder; its path."""
    raw = generate_federation(out / "raw", n_sites=1, cases_per_site=(2,), seed=seed)[0]
    source = sorted(p for p in raw.iterdir() if p.is_dir())[0]
    case_dir = out / "brats" / source.name
    case_dir.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.nii.gz"):
        image = sitk.ReadImage(str(path))
        centre = image.TransformContinuousIndexToPhysicalPoint(
            [(s - 1) / 2 for s in image.GetSize()]
        )
        grid = sitk.Image(BRATS_SHAPE, image.GetPixelID())
        grid.SetSpacing((1.0, 1.0, 1.0))
        grid.SetOrigin([c - (s - 1) / 2 for c, s in zip(centre, BRATS_SHAPE, strict=True)])
        label = path.name.endswith("-seg.nii.gz")
        interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
        resampled = sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0)
        write_nifti(resampled, case_dir / path.name, dtype=np.uint8 if label else np.float32)
    return case_dir


def run(out: Path, *, preset: str, repeats: int, device: str) -> dict[str, Any]:
    """Time both pipelines on the same case, alternating; medians and the ratio."""
    from fedseg.server_app import save_model
    from fedseg.task.model import build_model

    case = find_case(brats_sized_case(out, seed=0))
    model_path = out / "model" / "model.pt"
    run_config = RunConfig(model_preset=preset, patch_size=PATCH[preset])
    save_model(model_path, build_model(preset, seed=0).state_dict(), run=run_config,
               trained_on="benchmark", provenance={},
               harmonisation=harmonisation_parameters(target_spacing=(1.0, 1.0, 1.0)))  # fmt: skip
    artifact = load_artifact(model_path)
    network = artifact.network(resolve_device(device))
    grid: tuple[int, ...] = ()
    times: dict[str, list[dict[str, float]]] = {"predict": [], "predict_mirror": []}
    for i in range(repeats):
        for name, mirror in (("predict", False), ("predict_mirror", True)):
            options = PredictOptions(mirror=mirror)
            result = predict_case(artifact, network, case, out / "pred" / f"{name}-{i}",
                                  options=options)  # fmt: skip
            times[name].append({**result.seconds, "total": sum(result.seconds.values())})
            grid = result.canonical.shape
            print(name, {k: round(v, 2) for k, v in times[name][-1].items()}, flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
               for name, rows in times.items()}  # fmt: skip
    return {
        "case_shape": list(BRATS_SHAPE),
        "canonical_grid": list(grid),
        "preset": preset,
        "roi_size": artifact.roi_size,
        "device": str(next(network.parameters()).device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": repeats,
        "medians_s": medians,
        "ratio_mirror_over_plain": medians["predict_mirror"]["inference"]
        / medians["predict"]["inference"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``predict --out DIR [--repeats 2] [--preset brats] [--device auto]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", choices=sorted(PATCH), default="brats")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    payload = run(args.out, preset=args.preset, repeats=args.repeats, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark_predict.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return 0
