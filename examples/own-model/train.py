"""Train the model outside raymia on 200 rows of scikit-learn's digits; save the weights and the rows."""
import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from mymodel import build, fit

digits = load_digits()
x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # [1797, 1, 8, 8], the order raymia uses
y = torch.tensor(digits.target)
members = np.random.default_rng(1).choice(len(x), 200, replace=False)
model = fit(build((1, 8, 8), 10), x[members], y[members], seed=0, device="cpu")
save_file(model.state_dict(), "model.safetensors")
np.save("members.npy", members)
