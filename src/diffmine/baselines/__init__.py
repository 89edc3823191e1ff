"""Baselines the typicality pipeline is compared with.

- :mod:`diffmine.baselines.doersch`: discriminative patch mining (Doersch et al. 2013, "What makes
  Paris look like Paris?"), as the authors of the diffusion-mining paper reimplemented it.
"""

from .doersch import DoerschConfig, mine_doersch, run_doersch

__all__ = ["DoerschConfig", "mine_doersch", "run_doersch"]
