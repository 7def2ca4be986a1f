"""Site profiles: the scanner and curation habits of each simulated hospital.

The default federation cycles through five archetypes, one per raw layout a real site
may hand over: BraTS 2023 folders, a DICOM study, BraTS 2021 folders with thick slices,
an MSD Task01 4D dataset and an nnU-Net raw dataset, each with its own voxel spacing,
stored orientation, intensity scale, bias, noise and label convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")

#: Raw layouts a site can be written in (see :mod:`fedseg.synth.writers`).
LAYOUTS: tuple[str, ...] = ("brats2023", "brats2021", "dicom-study", "msd", "nnunet-raw")

AXIS_OF_CODE = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


@dataclass(frozen=True)
class SiteProfile:
    """Scanner and curation habits of one simulated site.

    Attributes
    ----------
    name
        Folder name of the site, e.g. ``"hospital-a"``.
    layout
        Raw layout, one of :data:`LAYOUTS`: ``"brats2023"`` (``-t1n``, ``-t1c``, ...),
        ``"brats2021"`` (``_t1``, ``_t1ce``, ``_t2``, ``_flair``), ``"dicom-study"`` (one
        MR series per modality), ``"msd"`` (4D Task01 files) or ``"nnunet-raw"``.
    spacing
        Voxel size in mm along the three stored array axes.
    orientation
        Axis codes of the stored array as ``nibabel.aff2axcodes`` spells them,
        e.g. ``"RAS"`` or ``"LPS"``.
    gain, offset
        Per-modality scanner scale (t1n, t1c, t2w, t2f): stored = gain * signal + offset.
    bias_strength
        Amplitude of the smooth multiplicative bias field, on a log scale.
    noise
        Rician noise sigma relative to the white-matter signal.
    n_cases
        Number of cases at this site.
    size_mix
        Relative weights of (small, large) tumours.
    et_label
        Value written for enhancing tumour: 3 (BraTS 2023) or 4 (BraTS 2021).  MSD sites
        write MSD's own convention (see :attr:`label_values`) and need 3.
    """

    name: str
    layout: str = "brats2023"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    orientation: str = "RAS"
    gain: tuple[float, float, float, float] = (1000.0, 1000.0, 1000.0, 1000.0)
    offset: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    bias_strength: float = 0.15
    noise: float = 0.03
    n_cases: int = 8
    size_mix: tuple[float, float] = (0.5, 0.5)
    et_label: int = 3

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            problems.append(f"name {self.name!r} is not a plain folder name")
        if self.layout not in LAYOUTS:
            problems.append(f"layout {self.layout!r} is not one of {sorted(LAYOUTS)}")
        if len(self.spacing) != 3 or not all(0.5 <= s <= 10.0 for s in self.spacing):
            problems.append(f"spacing {self.spacing} must be three values in 0.5..10 mm")
        codes = self.orientation.upper()
        if len(codes) != 3 or sorted(AXIS_OF_CODE.get(c, -1) for c in codes) != [0, 1, 2]:
            problems.append(f"orientation {self.orientation!r} is not axis codes like 'RAS'")
        if len(self.gain) != 4 or len(self.offset) != 4 or min(self.gain) <= 0:
            problems.append("gain and offset need four values (t1n, t1c, t2w, t2f), gain > 0")
        if not 0.0 <= self.bias_strength <= 1.0 or not 0.0 <= self.noise <= 0.5:
            problems.append("bias_strength must be in 0..1 and noise in 0..0.5")
        if self.n_cases < 2 or self.n_cases > 999:
            problems.append(f"n_cases {self.n_cases} must be in 2..999")
        if len(self.size_mix) != 2 or min(self.size_mix) < 0 or sum(self.size_mix) <= 0:
            problems.append(f"size_mix {self.size_mix} must be two non-negative weights")
        if self.et_label not in (3, 4) or (self.layout == "msd" and self.et_label != 3):
            problems.append(f"et_label {self.et_label} must be 3 or 4 (3 for msd)")
        if problems:
            raise ValueError(f"SiteProfile {self.name!r}: " + "; ".join(problems))

    @property
    def label_values(self) -> tuple[int, int, int]:
        """Values written for (NETC, SNFH, ET): MSD swaps the first two (1 is oedema)."""
        return (2, 1, 3) if self.layout == "msd" else (1, 2, self.et_label)


# The five archetypes the default federation cycles through, one per raw layout.
_ARCHETYPES = (
    # Modern 3D protocol: isotropic voxels, RAS storage, BraTS 2023 conventions.
    SiteProfile(
        name="hospital-a",
        layout="brats2023",
        spacing=(2.0, 2.0, 2.0),
        orientation="RAS",
        gain=(1100.0, 1250.0, 1500.0, 950.0),
        offset=(0.0, 0.0, 0.0, 0.0),
        bias_strength=0.12,
        noise=0.025,
        size_mix=(0.3, 0.7),
        et_label=3,
    ),
    # A PACS export: one MR DICOM series per sequence (LPS like every DICOM grid), strong
    # coil bias, noisier, small tumours; labels drawn on the T1 series' grid.
    SiteProfile(
        name="hospital-b",
        layout="dicom-study",
        spacing=(1.7, 1.7, 2.2),
        orientation="LPS",
        gain=(1800.0, 2000.0, 1900.0, 1600.0),
        offset=(40.0, 40.0, 25.0, 30.0),
        bias_strength=0.3,
        noise=0.04,
        size_mix=(0.7, 0.3),
        et_label=3,
    ),
    # Older 2D protocol: thick axial slices, BraTS 2021 names with ET written as 4.
    SiteProfile(
        name="hospital-c",
        layout="brats2021",
        spacing=(1.8, 1.8, 6.0),
        orientation="RAS",
        gain=(700.0, 820.0, 1000.0, 640.0),
        offset=(10.0, 10.0, 10.0, 10.0),
        bias_strength=0.2,
        noise=0.03,
        size_mix=(0.5, 0.5),
        et_label=4,
    ),
    # A research archive in MSD Task01 form: 4D files in radiological (LAS) order, low
    # intensity scale, MSD's own labels (1 oedema, 2 non-enhancing, 3 enhancing).
    SiteProfile(
        name="hospital-d",
        layout="msd",
        spacing=(1.5, 1.5, 2.5),
        orientation="LAS",
        gain=(520.0, 610.0, 790.0, 450.0),
        offset=(0.0, 0.0, 0.0, 0.0),
        bias_strength=0.18,
        noise=0.035,
        size_mix=(0.5, 0.5),
        et_label=3,
    ),
    # An nnU-Net raw dataset exported from a FreeSurfer-style (LIA) pipeline: coronal
    # slice order, anisotropic voxels, high intensity scale, BraTS 2023 values.
    SiteProfile(
        name="hospital-e",
        layout="nnunet-raw",
        spacing=(2.2, 2.2, 2.4),
        orientation="LIA",
        gain=(2600.0, 2900.0, 3300.0, 2300.0),
        offset=(0.0, 0.0, 0.0, 0.0),
        bias_strength=0.1,
        noise=0.02,
        size_mix=(0.4, 0.6),
        et_label=3,
    ),
)


def _site_name(index: int) -> str:
    """Return ``hospital-a`` .. ``hospital-z``, then ``hospital-27`` onwards."""
    return f"hospital-{chr(ord('a') + index)}" if index < 26 else f"hospital-{index + 1}"


def default_profiles(n_sites: int, *, cases_per_site: int | Sequence[int]) -> list[SiteProfile]:
    """Return the default heterogeneous site profiles.

    Parameters
    ----------
    n_sites
        Number of sites (>= 1).  Sites beyond the five archetypes (hospital-a .. -e in
        layouts brats2023, dicom-study, brats2021, msd, nnunet-raw) cycle through them
        under new names, with slightly shifted intensity scale and noise.
    cases_per_site
        One count per site, or one int ``n`` scaled per site to ``n``, ``~0.75 n``,
        ``~0.5 n`` (cycling, at least ``min(n, 4)``) so the sites stay unequal.

    Returns
    -------
    list of SiteProfile
    """
    counts = _case_counts(n_sites, cases_per_site)
    profiles = []
    for i, n in enumerate(counts):
        base = _ARCHETYPES[i % len(_ARCHETYPES)]
        cycle = i // len(_ARCHETYPES)
        # Later cycles get another scanner of the same kind: shifted scale and noise.
        factor = 1.0 + 0.08 * cycle
        profiles.append(
            replace(
                base,
                name=_site_name(i),
                n_cases=n,
                gain=tuple(g * factor for g in base.gain),  # type: ignore[arg-type]
                noise=min(0.5, base.noise * (1.0 + 0.15 * cycle)),
            )
        )
    return profiles


def _case_counts(n_sites: int, cases_per_site: int | Sequence[int]) -> list[int]:
    """Turn the ``cases_per_site`` argument into one validated count per site."""
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if isinstance(cases_per_site, bool):
        raise ValueError(f"cases_per_site must be a count, got {cases_per_site!r}")
    if isinstance(cases_per_site, int):
        if cases_per_site < 2:
            raise ValueError(f"cases_per_site must be >= 2, got {cases_per_site}")
        floor = min(cases_per_site, 4)
        scales = (1.0, 0.75, 0.5)
        counts = [max(floor, round(cases_per_site * scales[i % 3])) for i in range(n_sites)]
    else:
        counts = [int(c) for c in cases_per_site]
        if len(counts) != n_sites:
            raise ValueError(f"cases_per_site has {len(counts)} counts for {n_sites} sites")
    bad = [c for c in counts if c < 2 or c > 999]
    if bad:
        raise ValueError(f"every site needs 2..999 cases, got {counts}")
    return counts
