"""Trial resource requests follow what the cluster has: fractional GPUs when present, never a missing GPU."""

import pytest

from raymia.config import ComputeConfig
from raymia.errors import UserError
from raymia.orchestration.cluster import DEFAULT_GPU_FRACTION, ClusterInfo, trial_resources

CPU_ONLY = ClusterInfo("local", True, cpus=2, gpus=0)
WITH_GPUS = ClusterInfo("remote", False, cpus=16, gpus=4)


def test_auto_uses_a_gpu_fraction_only_when_the_cluster_has_gpus():
    assert trial_resources(ComputeConfig(), CPU_ONLY) == {"cpu": 1.0, "gpu": 0.0}
    assert trial_resources(ComputeConfig(), WITH_GPUS) == {"cpu": 1.0, "gpu": DEFAULT_GPU_FRACTION}
    assert trial_resources(ComputeConfig(device="cpu"), WITH_GPUS)["gpu"] == 0.0
    assert trial_resources(ComputeConfig(gpus_per_trial=0.5, cpus_per_trial=2), WITH_GPUS) == {"cpu": 2.0, "gpu": 0.5}


@pytest.mark.parametrize(("compute", "field"), [
    (ComputeConfig(device="cuda"), "compute.device"),
    (ComputeConfig(gpus_per_trial=1), "compute.gpus_per_trial"),
    (ComputeConfig(cpus_per_trial=4), "compute.cpus_per_trial"),
])
def test_impossible_requests_name_their_field(compute, field):
    with pytest.raises(UserError, match=field):
        trial_resources(compute, CPU_ONLY)


def test_more_gpus_per_trial_than_the_cluster_has():
    with pytest.raises(UserError, match="compute.gpus_per_trial"):
        trial_resources(ComputeConfig(gpus_per_trial=8), WITH_GPUS)
