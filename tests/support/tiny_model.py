"""A tiny ModelMixin (two linear layers) for the core tests of saving and loading."""

import torch

from fusediff.configuration import register_to_config
from fusediff.modeling import ModelMixin


class Tiny(ModelMixin):
    @register_to_config
    def __init__(self, features: int = 3, hidden: int = 5):
        super().__init__()
        self.inp = torch.nn.Linear(features, hidden)
        self.out = torch.nn.Linear(hidden, features)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))
