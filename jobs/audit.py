"""Ray Jobs entrypoint: ``ray job submit --working-dir . -- python jobs/audit.py configs/quickstart.yaml``.

Inside a job ``RAY_ADDRESS`` is set, so the audit joins the cluster it was submitted to. Pass absolute paths
(or ``MLFLOW_TRACKING_URI`` in the runtime env): the job runs in a temporary copy of the working dir.
"""

import sys

from raymia.allocator import reexec_with_allocator_env
from raymia.cli import main

if __name__ == "__main__":
    reexec_with_allocator_env()
    sys.exit(main(["audit", *sys.argv[1:]]))
