"""DICOM support on real files that registry packages ship (pydicom's and pydicom-data's).

Nothing is downloaded: files are looked up with ``download=False`` and a test skips, naming
the file, when its package is absent.  ``dicomdirtests`` ships with pydicom itself; the
larger files (``emri_small*``, ``MR2_*``, ``693_*``...) come from ``pydicom-data``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data_adapters.convert import convert_image
from data_adapters.dicom import list_series, read_series
from data_adapters.dicom_volume import decode_file
from data_adapters.errors import DataError
from data_adapters.geometry import LPS_TO_RAS, ijk_array


def shipped(name: str) -> Path:
    """A test file pydicom or pydicom-data ships, or a skip naming it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(str(path))


@pytest.fixture(scope="module")
def dicomdir_tests() -> Path:
    """pydicom's ``dicomdirtests`` folder: three patients' series from GE, Philips, Agfa."""
    return shipped("DICOMDIR").parent


def _refusal(folder: Path, uid: str | None = None) -> str:
    with pytest.raises(DataError) as info:
        read_series(folder, series_uid=uid)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(folder))
    return text


def test_dicom_real_ge_ct_series_geometry_after_convert(
    dicomdir_tests: Path, tmp_path: Path
) -> None:
    folder = dicomdir_tests / "98892001" / "CT5N"  # GE 'SmartScore - Gated 0.5 sec', 5 slices
    result = convert_image(folder, tmp_path / "ct.nii.gz")
    nifti = nib.load(result.output)
    data = np.asanyarray(nifti.dataobj)
    files = sorted(folder.iterdir())
    assert data.shape[2] == len(files) == 5
    worst = 0.0
    for path in files:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # (i, j)
        [k] = [z for z in range(data.shape[2]) if np.array_equal(data[:, :, z], hu)]
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        row_dir, col_dir = (np.array([float(v) for v in ds.ImageOrientationPatient[a:a + 3]])
                            for a in (0, 3))  # fmt: skip
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        for i, j in ((0, 0), (ds.Columns - 1, 0), (0, ds.Rows - 1), (7, 9)):
            lps = ipp + i * col_spacing * row_dir + j * row_spacing * col_dir
            ras = nifti.affine @ [i, j, k, 1.0]
            worst = max(worst, float(np.linalg.norm(ras[:3] - (LPS_TO_RAS @ [*lps, 1.0])[:3])))
    assert worst < 0.1, f"voxel centres off their DICOM positions by {worst:.4f} mm"
    ds = pydicom.dcmread(files[0])
    zooms = nifti.header.get_zooms()
    assert zooms == pytest.approx((float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 2.5))
    assert nib.aff2axcodes(nifti.affine) == ("L", "P", "S")


def test_dicom_real_ge_ct_series_picked_by_uid_from_the_whole_tree(dicomdir_tests: Path) -> None:
    [ct] = [s for s in list_series(dicomdir_tests) if s.description.startswith("SmartScore")]
    assert (ct.modality, ct.n_files) == ("CT", 5)
    whole = read_series(dicomdir_tests, series_uid=ct.uid)
    alone = read_series(dicomdir_tests / "98892001" / "CT5N")
    assert np.array_equal(ijk_array(whole), ijk_array(alone))
    assert whole.GetOrigin() == alone.GetOrigin()
    assert "14 DICOM series found" in _refusal(dicomdir_tests)


def test_dicom_real_gapped_series_is_refused(dicomdir_tests: Path) -> None:
    text = _refusal(dicomdir_tests / "77654033" / "CT2")  # GE 'Routine Brain': 1 + 3 slices
    assert "missing slices" in text and "202 mm gap" in text


def test_dicom_real_three_plane_localiser_is_refused(dicomdir_tests: Path) -> None:
    folder = dicomdir_tests / "98892003" / "MR2"  # Philips 'T/S/C RF FAST PILOT', two series
    pilots = [s for s in list_series(folder) if s.description == "T/S/C RF FAST PILOT"]
    assert [s.n_files for s in pilots] == [3, 3]
    for info in pilots:
        text = _refusal(folder, info.uid)
        assert "not parallel" in text and "3 different ImageOrientationPatient" in text


def test_dicom_real_scout_and_radial_series_are_refused(dicomdir_tests: Path) -> None:
    assert "2 different ImageOrientationPatient" in _refusal(dicomdir_tests / "98892001" / "CT2N")
    assert "7 different ImageOrientationPatient" in _refusal(dicomdir_tests / "98892003" / "MR700")


@pytest.mark.parametrize(
    ("reference", "variant"),
    [
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("emri_small.dcm", "emri_small_RLE.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("emri_small.dcm", "emri_small_big_endian.dcm"),
        ("693_UNCR.dcm", "693_J2KR.dcm"),
        ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
    ],
)
def test_dicom_real_compressed_files_decode_to_the_uncompressed_pixels(
    reference: str, variant: str
) -> None:
    expected, _ = decode_file(shipped(reference))
    decoded, rescaled = decode_file(shipped(variant))
    assert not rescaled
    assert decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)


def _recompress(source: Path, target: Path, syntax: str) -> Path:
    """Re-encode a real file with GDCM (python-gdcm), keeping its header."""
    gdcm = pytest.importorskip("gdcm", reason="python-gdcm encodes the JPEG variants")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


def test_dicom_real_jpeg_lossless_decodes_exactly(tmp_path: Path) -> None:
    source = shipped("MR_small.dcm")
    target = _recompress(source, tmp_path / "jll.dcm", "JPEGLosslessProcess14_1")
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert np.array_equal(decode_file(target)[0], decode_file(source)[0])


def test_dicom_real_jpeg_baseline_decodes_within_lossy_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    eight_bit = (ds.pixel_array.astype(float) / ds.pixel_array.max() * 255).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = eight_bit.tobytes()
    ds.save_as(tmp_path / "mr8.dcm")
    target = _recompress(tmp_path / "mr8.dcm", tmp_path / "jb.dcm", "JPEGBaselineProcess1")
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    decoded = decode_file(target)[0][0].astype(int)
    assert np.abs(decoded - eight_bit).max() <= 8
    assert np.abs(decoded - eight_bit).mean() < 1.0


def test_dicom_real_jpeg_lossless_shipped_file_agrees_with_simpleitk() -> None:
    import SimpleITK as sitk

    path = shipped("JPEG-LL.dcm")
    decoded, rescaled = decode_file(path)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # GDCM inside SimpleITK
    assert not rescaled and np.array_equal(decoded, itk.reshape(decoded.shape))


def test_dicom_real_12_bit_jpeg_extended_decodes() -> None:
    # pydicom's GDCM plugin refuses 12-bit JPEG extended; SimpleITK's GDCM decodes it.
    decoded = decode_file(shipped("JPGExtended.dcm"))[0].astype(float)
    reference = decode_file(shipped("JPEG-LL.dcm"))[0].astype(float)  # the lossless encoding
    assert decoded.shape == reference.shape
    assert np.abs(decoded - reference).mean() < 3  # lossy, on values 0-280
    assert np.corrcoef(decoded.ravel(), reference.ravel())[0, 1] > 0.98


@pytest.mark.parametrize(
    "variant", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_dicom_real_compressed_series_stack_like_the_uncompressed_one(
    tmp_path: Path, variant: str
) -> None:
    def series(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        uid = generate_uid()
        for k in range(4):  # the same real slice, stacked 2 mm apart
            ds = pydicom.dcmread(shipped(name))
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 2.0 * k]
            ds.save_as(folder / f"{k}.dcm")
        return folder

    reference = read_series(series("MR_small.dcm"))
    image = read_series(series(variant))
    assert np.array_equal(ijk_array(image), ijk_array(reference))
    assert image.GetSpacing() == pytest.approx((0.3125, 0.3125, 2.0))


def test_dicom_real_enhanced_multiframe_geometry(tmp_path: Path) -> None:
    path = shipped("eCT_Supplemental.dcm")  # enhanced CT: 2 frames, per-frame positions
    shutil.copy(path, tmp_path / "enhanced.dcm")
    image = read_series(tmp_path)
    ds = pydicom.dcmread(path)
    values = ijk_array(image)
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        stored = ds.pixel_array[index].T.astype(int) - 1024  # shared rescale: intercept -1024
        [k] = [z for z in range(2) if np.array_equal(values[:, :, z], stored)]
        assert np.allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=1e-3)
    assert image.GetSpacing() == pytest.approx((0.388672, 0.388672, 10.0))
    assert image.GetDirection()[:3] == pytest.approx((-1.0, 0.0, 0.0))  # IOP row (-1, 0, 0)


def test_dicom_real_enhanced_mr_without_frame_geometry_is_refused(tmp_path: Path) -> None:
    shutil.copy(shipped("emri_small.dcm"), tmp_path / "emri.dcm")  # anonymised: groups removed
    with pytest.raises(DataError) as info:
        read_series(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'emri.dcm'}: no usable ImagePositionPatient"
        " (multi-frame file without per-frame functional groups)"
    )
