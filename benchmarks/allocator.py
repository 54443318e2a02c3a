"""glibc allocator settings (raymia/allocator.py) on and off, side by side in fresh processes.

    .venv/bin/python benchmarks/allocator.py [--repeats 3]

Each arm is a fresh interpreter (glibc reads the settings at start) that trains the NN attack's network and a
Fashion-MNIST-sized MLP once and reports both times; arms alternate so load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from raymia.allocator import ALLOCATOR_ENV

CHILD = r"""
import json, time, torch
from raymia.training.loop import TrainRecipe, train_classifier
from raymia.models.classifiers import ModelSpec, build_model
g = torch.Generator().manual_seed(0)
out = {}
for name, (shape, n, hidden, bs) in {"nn-attack-net": ((24,), 14000, [256], 512),
                                     "mlp-784-128": ((1, 28, 28), 10000, [128], 128)}.items():
    x, y = torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    model = build_model(ModelSpec(arch="mlp", params={"hidden": hidden}), shape, 10, seed=0)
    t = time.perf_counter()
    train_classifier(model, x, y, TrainRecipe(epochs=10, batch_size=bs), seed=0)
    out[name] = time.perf_counter() - t
print(json.dumps(out))
"""


def run(tuned: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    if tuned:
        env.update(ALLOCATOR_ENV)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from raymia.machine import describe_machine

    rows = {True: [], False: []}
    for _ in range(args.repeats):
        for tuned in (False, True):
            rows[tuned].append(run(tuned))
    print(f"machine: {describe_machine()}")
    for name in rows[True][0]:
        base = sorted(r[name] for r in rows[False])
        tuned = sorted(r[name] for r in rows[True])
        print(f"  {name:<14} glibc defaults: min {base[0]:6.2f} s, median {base[len(base) // 2]:6.2f} s   "
              f"raymia settings: min {tuned[0]:6.2f} s, median {tuned[len(tuned) // 2]:6.2f} s   "
              f"median ratio x{base[len(base) // 2] / tuned[len(tuned) // 2]:.1f}")


if __name__ == "__main__":
    main()
