"""Write a whole raw federation: one folder per site in its own layout, and the ground truth."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedseg.synth.profiles import SiteProfile, default_profiles
from fedseg.synth.render import render_case
from fedseg.synth.writers import finish_site, write_case


def generate_federation(
    out: Path,
    *,
    n_sites: int = 3,
    cases_per_site: int | Sequence[int] = (12, 8, 6),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    profiles: Sequence[SiteProfile] | None = None,
) -> list[Path]:
    """Write a raw multi-site federation under ``out``.

    Parameters
    ----------
    out
        Output folder; gets one folder per site, in the site's layout (see
        :func:`default_profiles`), and ``federation.json`` (ground truth of the
        generation, for tests and reports; the pipeline ignores it).
    n_sites, cases_per_site
        See :func:`default_profiles`.  A sequence needs one count per site.
    seed
        Root seed: sites draw from independent children of ``SeedSequence(seed)``,
        and each case from a child of its site's, so a case does not depend on
        how many cases come before it.
    progress
        Called with a short message after each case is written.
    overwrite
        Replace site folders that already exist; otherwise they are refused.
    profiles
        The sites to write instead of the default ones (``n_sites`` and
        ``cases_per_site`` are then ignored), e.g. a benchmark's harder federation.

    Returns
    -------
    list of Path
        The site folders ``out/<site-name>``, in site order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if profiles is None:
        profiles = default_profiles(n_sites, cases_per_site=cases_per_site)
    names = [p.name for p in profiles]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"profiles need distinct site names, got {names}")
    out = Path(out)
    site_dirs = [out / p.name for p in profiles]
    busy = [d for d in site_dirs if d.exists() and any(d.iterdir())]
    if busy and not overwrite:
        raise FileExistsError(
            f"{busy[0]}: already exists and is not empty (overwrite it or pick another folder)"
        )
    for d in busy:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    site_seeds = np.random.SeedSequence(seed).spawn(len(profiles))
    sites = []
    for index, (profile, site_dir, site_seed) in enumerate(
        zip(profiles, site_dirs, site_seeds, strict=True)
    ):
        cases = []
        for k, case_seed in enumerate(site_seed.spawn(profile.n_cases)):
            number = index * 1000 + k + 1  # unique across the federation
            case = render_case(profile, np.random.default_rng(case_seed))
            uid_root = f"fedseg.synth/{seed}/{profile.name}/{number}"
            case_id = write_case(profile, case, site_dir, number=number, uid_root=uid_root)
            cases.append({"id": case_id, **case.info})
            if progress is not None:
                progress(f"{profile.name}: case {k + 1}/{profile.n_cases}")
        finish_site(profile, site_dir, [c["id"] for c in cases])
        netc, snfh, et = profile.label_values
        sites.append(
            {
                "name": profile.name,
                "profile": asdict(profile),
                "labels": {"NETC": netc, "SNFH": snfh, "ET": et},
                "cases": cases,
            }
        )
    manifest = {"generator": "fedseg.synth", "seed": seed, "n_sites": len(profiles), "sites": sites}
    (out / "federation.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return site_dirs
