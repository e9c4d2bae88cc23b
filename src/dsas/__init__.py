"""dsas: Dynamically Scaled Activation Steering (arXiv:2512.03661).

    z' = z + lam * g_l(z) * (T_l(z) - z)

`T_l` (how to steer) comes from any method (CAA, ITI, LinEAS, Linear-AcT); `g_l` (when to steer) is a learned
per-site, per-token gate. See README.md and docs/.
"""

from dsas.data import PromptSets

__all__ = ["PromptSets"]
__version__ = "0.1.0"
