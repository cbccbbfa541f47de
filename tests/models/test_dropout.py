"""The models skip Dropout modules that are the identity (eval mode, p = 0) and keep the ones that drop."""

from __future__ import annotations

import torch
from torch import nn

from fusediff.models.activations import dropout
from fusediff.models.feed_forward import FeedForward


def test_identity_dropout_returns_its_input():
    x = torch.randn(3, 4)
    assert dropout(nn.Dropout(0.5).eval(), x) is x
    assert dropout(nn.Dropout(0.0).train(), x) is x


def test_training_dropout_still_drops():
    x = torch.ones(1000)
    torch.manual_seed(0)
    y = dropout(nn.Dropout(0.5).train(), x)
    zeros = int((y == 0).sum())
    assert 400 < zeros < 600, f"{zeros} of 1000 dropped with p = 0.5"
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 2.0))


def test_feed_forward_dropout_follows_the_mode():
    torch.manual_seed(0)
    ff = FeedForward(8, dropout=0.5, activation_fn="gelu")
    x = torch.randn(2, 5, 8)
    ff.eval()
    with torch.no_grad():
        reference = ff.net[2](ff.net[0](x))  # what the eval forward is: no dropout between the projections
        torch.testing.assert_close(ff(x), reference, rtol=0, atol=0)
        ff.train()
        torch.manual_seed(1)
        dropped = ff(x)
        torch.manual_seed(1)
        expected = ff.net[2](nn.functional.dropout(ff.net[0](x), 0.5, training=True))
    torch.testing.assert_close(dropped, expected, rtol=0, atol=0)
    assert not torch.equal(dropped, reference)
