"""Score a folder of cases with the BraTS challenge's own metric package (brats-evaluation).

Run with the interpreter of the separate environment that ``make-brats-env.sh`` creates,
never with fedseg's (brats-evaluation is AGPL and pins numpy/rich below fedseg's)::

    .venv-brats/bin/python tests/reference/brats_runner.py \\
        --ref-dir REFS --pred-dir PREDS --out scores.json [--config gli]

Input layout: ``REFS/<case>-seg.nii.gz`` references and ``PREDS/<case>.nii.gz``
predictions with canonical BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET). ``<case>`` must hold a
BraTS subject id (``BraTS-GLI-00001-000``) because the package's own CLI pairs files by it;
this script pairs them by name and keeps the id only for the package's JSON.

The numbers go through the package's official path end to end: ``evaluate_single_exam``
(panoptica with the bundled ``config_<name>.yaml``) writes the panoptica JSON, and
``parse_seg_results`` turns it into the challenge's CSV (where an infinite global HD95
becomes 373). The output JSON holds, per case and region (``WT``/``TC``/``ET``), the CSV's
columns under short names plus a few raw panoptica values:

- ``global_dice``, ``global_hd95`` (CSV: ``global_dsc_*``, ``global_hd95_*``);
- ``lesion_dice``, ``lesion_hd95`` (CSV: ``lesionwise_dsc_mean_*``, ``lesionwise_hd95_mean_*``:
  panoptica's ``sq_dsc`` and ``sq_hd95``, means over matched lesions only);
- ``tp``, ``fp``, ``fn`` (CSV: ``all_instance_*``);
- ``raw_global_hd95`` (before the 373 substitution), ``n_ref_instances``,
  ``n_pred_instances`` and ``ref_instance_dice`` (per reference instance, ``None`` unmatched).

Non-finite values are written as Python's json writes them (``NaN``, ``Infinity``), which
Python's ``json.loads`` reads back. A case the package fails on makes this script exit 1:
the caller must never compare against a silently missing case.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REGIONS = {"wt": "WT", "tc": "TC", "et": "ET"}
REF_SUFFIX = "-seg.nii.gz"


def pair_cases(ref_dir: Path, pred_dir: Path) -> dict[str, tuple[Path, Path]]:
    """``{case: (prediction, reference)}`` for every reference; a missing prediction is an
    error (the package would score it as a "missing" subject with its penalties)."""
    pairs: dict[str, tuple[Path, Path]] = {}
    for ref in sorted(ref_dir.glob(f"*{REF_SUFFIX}")):
        case = ref.name[: -len(REF_SUFFIX)]
        pred = pred_dir / f"{case}.nii.gz"
        if not pred.is_file():
            raise FileNotFoundError(f"no prediction {pred.name} for reference {ref.name}")
        pairs[case] = (pred, ref)
    if not pairs:
        raise FileNotFoundError(f"no *{REF_SUFFIX} reference in {ref_dir}")
    return pairs


def run_official(pairs: dict[str, tuple[Path, Path]], *, config: str, work: Path) -> Path:
    """Score every pair with the package and write its CSV; return the CSV's path."""
    from brats_evaluation import config_path, evaluate_single_exam, parse_seg_results
    from panoptica import Panoptica_Evaluator
    from panoptica.utils.citation_reminder import disable_citation_reminder

    disable_citation_reminder()
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path(config)))
    metrics: list[dict[str, Any]] = []
    for case, (pred, ref) in pairs.items():
        result = evaluate_single_exam(str(pred), str(ref), case, evaluator)
        if "error" in result:
            raise RuntimeError(f"brats-evaluation failed on {case}: {result['error']}")
        metrics.append(result)
    panoptica_json = work / "panoptica.json"
    # The same structure (and json.dump) as brats_evaluation.evaluation.main.
    panoptica_json.write_text(json.dumps({"metrics": metrics, "missings": []}, default=_plain))
    csv = work / "scores.csv"
    parse_seg_results(str(panoptica_json), str(csv))
    if not csv.is_file():
        raise RuntimeError("parse_seg_results wrote no CSV")
    return panoptica_json


def collect(panoptica_json: Path, csv: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Per case and region: the CSV's challenge numbers and a few raw panoptica values."""
    import pandas as pd

    table = pd.read_csv(csv).set_index("subject_id")
    raw = {m["subject_name"]: m for m in json.loads(panoptica_json.read_text())["metrics"]}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for case, subject in raw.items():
        row = table.loc[case]
        out[case] = {}
        for key, region in REGIONS.items():
            group = subject[key]
            out[case][region] = {
                "global_dice": float(row[f"global_dsc_{key}"]),
                "global_hd95": float(row[f"global_hd95_{key}"]),
                "lesion_dice": float(row[f"lesionwise_dsc_mean_{key}"]),
                "lesion_hd95": float(row[f"lesionwise_hd95_mean_{key}"]),
                "tp": int(row[f"all_instance_tp_{key}"]),
                "fp": int(row[f"all_instance_fp_{key}"]),
                "fn": int(row[f"all_instance_fn_{key}"]),
                "raw_global_hd95": _number(group.get("global_bin_hd95")),
                "n_ref_instances": int(group["n_ref_instances"]),
                "n_pred_instances": int(group["n_pred_instances"]),
                "ref_instance_dice": [
                    _number(i["sq_dsc"]) if i.get("is_matched") else None
                    for i in group.get("reference_instances", [])
                ],
            }
    return out


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _plain(value: Any) -> Any:
    """numpy scalars (panoptica's results) to plain Python numbers for json."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-dir", type=Path, required=True)
    parser.add_argument("--pred-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--config", default="gli", help="bundled config (gli, mets, ped, ...)")
    args = parser.parse_args(argv)
    try:
        pairs = pair_cases(args.ref_dir, args.pred_dir)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            panoptica_json = run_official(pairs, config=args.config, work=work)
            cases = collect(panoptica_json, work / "scores.csv")
    except (FileNotFoundError, RuntimeError) as error:
        print(f"brats_runner: {error}", file=sys.stderr)
        return 1
    result = {
        "versions": {
            name: importlib.metadata.version(name) for name in ("brats-evaluation", "panoptica")
        },
        "config": args.config,
        "cases": cases,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
