"""Deterministic generator of a heterogeneous multi-site raw BraTS-like federation.

Each case is a brain phantom defined in world coordinates (RAS+, millimetres, head near
the origin; :mod:`~fedseg.synth.phantom`): scalp, skull, CSF, cortical and deep grey
matter, white matter, and a glioma made of a necrotic core (NETC), an enhancing rim (ET)
and surrounding oedema (SNFH).  It is rendered (:mod:`~fedseg.synth.render`) into the four
BraTS modalities (t1n, t1c, t2w, t2f) with tissue contrasts as on real MRI, smooth
texture, a multiplicative bias field and Rician noise.

Each site is a :class:`SiteProfile` (:mod:`~fedseg.synth.profiles`): a scanner and a
curation habit.  Sites differ in voxel spacing (one writes thick slices, with partial
volume), in the orientation of the stored array (several are not RAS; their geometry is
still right), in intensity scale, bias and noise, in the number of cases and tumour sizes,
and in raw layout and label convention (:mod:`~fedseg.synth.writers`): BraTS 2023 and
BraTS 2021 folders (ET = 4), a DICOM study per patient, an MSD Task01 4D dataset (MSD
labels) and an nnU-Net raw dataset.

Everything is driven by explicit ``numpy.random.Generator`` objects: the same seed gives
byte-identical arrays (and the same DICOM UIDs).
"""

from fedseg.synth.federation import generate_federation
from fedseg.synth.profiles import LAYOUTS, MODALITIES, SiteProfile, default_profiles
from fedseg.synth.render import make_case
from fedseg.synth.writers import case_files, case_name

__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "SiteProfile",
    "case_files",
    "case_name",
    "default_profiles",
    "generate_federation",
    "make_case",
]
