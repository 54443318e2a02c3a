"""Ray Jobs entrypoint for the diffusion-model track:
``ray job submit --working-dir . -- python jobs/diffusion_audit.py configs/diffusion-quickstart.yaml``.

As with ``jobs/audit.py``: the job joins the cluster it was submitted to (``RAY_ADDRESS``); pass absolute paths
or ``MLFLOW_TRACKING_URI``, since the job runs in a temporary copy of the working dir.
"""

import sys

from raymia.cli import main

if __name__ == "__main__":
    sys.exit(main(["diffusion-audit", *sys.argv[1:]]))
