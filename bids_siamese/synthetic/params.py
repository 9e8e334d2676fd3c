"""Names, dataset sizes and signal parameters of the demo generator (no code, only settings)."""
from __future__ import annotations

from dataclasses import dataclass

GENERATOR_NAME = "bids-siamese-demo"
BIDS_VERSION = "1.10.0"

#: Padding (voxels at 1 mm, low/high side per axis) added around the template grid so the simulated head and
#: the top of the neck fit: template x -96..96, y -132..96, z -78..114 becomes x -108..108, y -144..108,
#: z -130..118 (RAS mm).
PAD = ((12, 12), (12, 12), (52, 4))

#: Spacing (mm) of the grid on which displacement fields are stored (trilinear interpolation in between).
FIELD_SPACING = 2
#: Spacing (mm) of the coarse look-up maps (distance to head/brain, lesion placement).
COARSE_SPACING = 4

#: Storage orientations drawn for the scans (axis codes as nibabel's ``aff2axcodes`` writes them).
ORIENTATIONS = ("RAS", "LAS", "LPS", "LPI", "RPI", "PIR", "PIL", "ASR", "ASL", "RSA", "LIA")

#: Neuromorphometrics labels of the structures whose volume change is simulated and recorded.
HIPPOCAMPUS_LABELS = (47, 48)
VENTRICLE_LABELS = (49, 50, 51, 52)
CEREBRAL_WM_LABELS = (44, 45)
#: Template intensity below which voxels of the (dilated) atlas ventricles count as ventricular CSF.
VENTRICLE_CSF_MAX = 45.0
#: Typical white-matter intensity of the template (its intensities run 0..98).
TEMPLATE_WM = 88.0


@dataclass(frozen=True)
class SizeSpec:
    """How many subjects and special scans a dataset size has."""

    mz_pairs: int
    dz_pairs: int
    singletons: int
    longitudinal: int
    lesions: int
    flipped: int

    @property
    def n_subjects(self) -> int:
        """Number of participants."""
        return 2 * self.mz_pairs + 2 * self.dz_pairs + self.singletons


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(mz_pairs=1, dz_pairs=1, singletons=1, longitudinal=2, lesions=1, flipped=1),
    "small": SizeSpec(mz_pairs=10, dz_pairs=6, singletons=8, longitudinal=16, lesions=8, flipped=4),
    "full": SizeSpec(mz_pairs=60, dz_pairs=36, singletons=48, longitudinal=96, lesions=48, flipped=24),
}


@dataclass(frozen=True)
class SignalParams:
    """Amplitudes of the planted signal; all lengths in mm, volume changes as fractions."""

    family_regions: tuple[str, ...] = ("Thalamus", "Brain_Stem", "Hippocampus")
    #: per-component standard deviation of the family velocity field inside the family regions (its flow, the
    #: family displacement, is diffeomorphic)
    family_amplitude_mm: float = 2.0
    family_sigma_mm: float = 6.0
    #: Gaussian smoothing of the family-region mask that localises the family field
    family_region_sigma_mm: float = 4.0
    #: standard deviation of the family (shared) and individual log-volume change of each family region
    family_volume_sd: float = 0.07
    individual_volume_sd: float = 0.03
    #: brain-wide individual displacement field
    individual_amplitude_mm: float = 1.2
    individual_sigma_mm: float = 12.0
    #: extra individual field outside the brain (scalp and skull shape)
    scalp_amplitude_mm: float = 2.0
    scalp_sigma_mm: float = 15.0
    #: global brain size: scale = 1 + sex_effect (M +, F -) + N(0, scale_sd), clipped to +-scale_max
    scale_sd: float = 0.02
    scale_sex_effect: float = 0.02
    scale_max: float = 0.05
    #: longitudinal change of decliners (uniform ranges of the target relative volume change)
    decline_hippocampus: tuple[float, float] = (-0.10, -0.05)
    decline_ventricles: tuple[float, float] = (0.10, 0.25)
    #: scan-rescan displacement noise between sessions (all longitudinal subjects)
    rescan_amplitude_mm: float = 0.15
    rescan_sigma_mm: float = 10.0
    #: width (Gaussian sigma) of the structure-volume fields (gradient of the smoothed structure mask)
    structure_sigma_mm: float = 3.0
    #: lesions: volume range (mm3, log-uniform spread), intensity range (template units; WM ~ 88)
    lesion_volume_mm3: tuple[float, float] = (100.0, 8000.0)
    lesion_intensity: tuple[float, float] = (25.0, 35.0)
    lesion_edge_mm: float = 0.6
    #: acquisition
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 15.0
    bias_range: tuple[float, float] = (0.10, 0.30)
    noise_fraction: tuple[float, float] = (0.01, 0.03)
    gain: tuple[float, float] = (8.0, 12.0)
