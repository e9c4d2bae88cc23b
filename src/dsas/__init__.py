"""dsas: Dynamically Scaled Activation Steering (arXiv:2512.03661).

    z' = z + lam * g_l(z) * (T_l(z) - z)

`T_l` (how to steer) comes from any method (CAA, ITI, LinEAS, Linear-AcT); `g_l` (when to steer) is a learned
per-site, per-token gate. See README.md and docs/.
"""

from dsas.calibrate import Calibration, calibrate_strength
from dsas.condition import Condition, ThresholdConfig
from dsas.data import PromptSets, list_prompt_sets, load_prompt_sets
from dsas.fit import CAAConfig, FitConfig, fit
from dsas.gates import DSASConfig, SiteGate
from dsas.maps import ITIConfig, LinearActConfig, SiteMap
from dsas.models import ModelUnavailableError, load_model
from dsas.sites import Site, resolve_sites
from dsas.steer import Trace
from dsas.steerer import Steerer
from dsas.train import E2EConfig, LinEASConfig

__all__ = [
    "CAAConfig",
    "Calibration",
    "Condition",
    "DSASConfig",
    "E2EConfig",
    "FitConfig",
    "ITIConfig",
    "ImageSets",
    "LinEASConfig",
    "LinearActConfig",
    "ModelUnavailableError",
    "PromptSets",
    "Site",
    "SiteGate",
    "SiteMap",
    "Steerer",
    "ThresholdConfig",
    "Trace",
    "calibrate_strength",
    "fit",
    "list_prompt_sets",
    "load_model",
    "load_prompt_sets",
    "resolve_sites",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> object:
    # ImageSets lives with the diffusion code, whose package imports diffusers (an optional extra): load it on use.
    if name == "ImageSets":
        from dsas.diffusion.steering import ImageSets

        return ImageSets
    raise AttributeError(f"module 'dsas' has no attribute {name!r}")
