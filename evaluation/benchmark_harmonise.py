"""How much harmonise_site costs over a plain SimpleITK conversion of the same cases.

Run as ``python -m evaluation.benchmark_harmonise --out DIR [--cases N]``.  One site
of the synthetic federation (``fedseg.synth``) is generated under ``DIR/raw``, then
three pipelines convert the same cases, alternating, ``--repeats`` times:

- ``harmonise``: :func:`data_adapters.site.harmonise_site` with ``qc=False``;
- ``harmonise_qc``: the same with ``qc=True``;
- ``plain``: per image, ``sitk.ReadImage`` -> ``DICOMOrient("RAS")`` -> ``Resample`` to
  the same spacing over the file's own field of view (linear; nearest for labels) ->
  ``sitk.WriteImage(.nii.gz)``, which is what a hand-written script would do;
- ``plain_same_writer``: the plain script writing through the project's NIfTI writer
  (nibabel), so the ratio against it isolates the pipeline from the writer.

Medians go to ``DIR/benchmark_harmonise.json``; the headline ``ratio`` is
median(harmonise) / median(plain).  The plain script does less (no sha256, mask,
crop, z-score, manifest, validation of labels) but writes the whole field of view.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from data_adapters.layouts import detect_layout, scan_cases
from data_adapters.site import harmonise_site
from data_adapters.sources import Source
from data_adapters.writers import write_nifti

#: The site benchmarked (index into the federation): hospital-e stores NIfTI files in LIA
#: order at 2.2 x 2.2 x 2.4 mm, so reorienting and resampling both do real work, and
#: reading is plain NIfTI on both sides (the DICOM site would time two DICOM readers).
DEFAULT_SITE = 4
IMPORT_RETRIES = 5
IMPORT_WAIT_S = 120.0


def generate_site(out: Path, *, cases: int, site: int, seed: int) -> Path:
    """Generate the synthetic federation's site ``site`` with ``cases`` cases; return its folder.

    Retries the import for a while: ``fedseg.synth`` may be mid-restructuring.
    """
    for attempt in range(IMPORT_RETRIES):
        try:
            from fedseg.synth import generate_federation

            break
        except ImportError:
            if attempt == IMPORT_RETRIES - 1:
                raise
            time.sleep(IMPORT_WAIT_S)
    # Only the benchmarked site gets `cases` cases; the ones before it are generated small.
    counts = [2] * site + [cases]
    sites = generate_federation(
        out, n_sites=site + 1, cases_per_site=counts, seed=seed, overwrite=True
    )
    return Path(sites[site])


def plain_convert(raw_dir: Path, out_dir: Path, *, spacing: float, writer: str = "sitk") -> None:
    """The plain SimpleITK script: read, orient RAS, resample, write every image of every case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in scan_cases(raw_dir, detect_layout(raw_dir)).cases:
        for role, source in case.sources().items():
            image = sitk.DICOMOrient(_plain_read(source), "RAS")
            label = role == "seg"
            size = [
                round(n * s / spacing)
                for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)
            ]
            out = sitk.Resample(
                image, size, sitk.Transform(),
                sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                image.GetOrigin(), (spacing,) * 3, image.GetDirection(), 0.0,
                image.GetPixelID() if label else sitk.sitkFloat32,
            )  # fmt: skip
            target = out_dir / f"{case.case_id}_{role}.nii.gz"
            if writer == "sitk":
                sitk.WriteImage(out, str(target), useCompression=True)
            else:
                write_nifti(out, target, dtype=np.uint8 if label else np.float32)


def _plain_read(source: Source) -> sitk.Image:
    """Read a file, one volume of a 4D file, or a DICOM series, with SimpleITK alone."""
    if source.series_uid is not None:
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(source.path), source.series_uid)
        reader.SetFileNames(names)
        image: sitk.Image = reader.Execute()
        return image
    image = sitk.ReadImage(str(source.path))
    if source.channel is not None:
        size = list(image.GetSize())
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, source.channel])
    return image


def run_benchmark(
    out: Path, *, cases: int, spacing: float, repeats: int, site: int, seed: int
) -> dict[str, Any]:
    """Time the pipelines side by side on one generated site; return the results."""
    raw = generate_site(out / "raw", cases=cases, site=site, seed=seed)
    n = len(scan_cases(raw, detect_layout(raw)).cases)
    target = (spacing, spacing, spacing)
    work = out / "work"
    pipelines: dict[str, Callable[[Path], object]] = {
        "harmonise": lambda d: harmonise_site(raw, d, target_spacing=target, qc=False),
        "harmonise_qc": lambda d: harmonise_site(raw, d, target_spacing=target, qc=True),
        "plain": lambda d: plain_convert(raw, d, spacing=spacing),
        "plain_same_writer": lambda d: plain_convert(raw, d, spacing=spacing, writer="nibabel"),
    }
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for repeat in range(repeats):
        # Alternate the order so drift in machine load hits every pipeline alike.
        order = list(pipelines) if repeat % 2 == 0 else list(reversed(pipelines))
        for name in order:
            destination = work / name
            shutil.rmtree(destination, ignore_errors=True)
            start = time.perf_counter()
            pipelines[name](destination)
            times[name].append(time.perf_counter() - start)
    qc_summary = json.loads((work / "harmonise_qc" / "qc" / "summary.json").read_text())
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "site": raw.name,
        "cases": n,
        "target_spacing_mm": list(target),
        "repeats": repeats,
        "seconds": times,
        "median_seconds": medians,
        "median_seconds_per_case": {k: v / n for k, v in medians.items()},
        "ratio": medians["harmonise"] / medians["plain"],
        "ratio_qc": medians["harmonise_qc"] / medians["plain"],
        "ratio_same_writer": medians["harmonise"] / medians["plain_same_writer"],
        "qc_seconds_per_case": (medians["harmonise_qc"] - medians["harmonise"]) / n,
        "qc_seconds_per_case_inside": qc_summary["qc_seconds_per_case"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work and result folder")
    parser.add_argument("--cases", type=int, default=4, help="cases in the generated site")
    parser.add_argument("--spacing", type=float, default=1.0, help="target spacing in mm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--site", type=int, default=DEFAULT_SITE, help="site index (0 = a)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cases < 2 or args.repeats < 1 or args.spacing <= 0:
        parser.error("need --cases >= 2, --repeats >= 1 and --spacing > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(
        args.out, cases=args.cases, spacing=args.spacing, repeats=args.repeats,
        site=args.site, seed=args.seed,
    )  # fmt: skip
    path = args.out / "benchmark_harmonise.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    per_case = result["median_seconds_per_case"]
    print(
        f"{result['site']}: {result['cases']} cases at {args.spacing:g} mm, "
        f"median of {args.repeats} (s/case): "
        + ", ".join(f"{k} {v:.2f}" for k, v in per_case.items())
    )
    print(
        f"ratio harmonise / plain = {result['ratio']:.2f} (with QC {result['ratio_qc']:.2f}; "
        f"against the plain script with the same writer {result['ratio_same_writer']:.2f}); "
        f"QC {result['qc_seconds_per_case']:.2f} s/case"
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
