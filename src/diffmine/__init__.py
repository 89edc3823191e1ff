"""diffmine: diffusion models as visual data-mining instruments (Siglidis et al., ECCV 2024).

    import diffmine
    run = diffmine.open_run("runs/demo")
    run.typicality_map("norland/img_0001.png")   # (H, W) float32
    run.patches()                                 # mined patches with their clusters
"""

from .rundir import Run, RunError, open_run

__version__ = "0.1.0"
__all__ = ["open_run", "Run", "RunError", "__version__"]
