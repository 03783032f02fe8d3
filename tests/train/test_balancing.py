"""Loss balancing (shoptune.train.balancing): hand-worked values and the methods' defining
properties on tiny problems."""
import math

import pytest
import torch

from shoptune.train.balancing import Balancer, group_means


def test_group_means_and_the_equal_and_uncertainty_losses_by_hand():
    row_sum = torch.tensor([2.0, 6.0, 3.0])   # answer-token loss sums of three rows
    row_n = torch.tensor([1.0, 2.0, 3.0])     # their answer tokens
    means, present = group_means(row_sum, row_n, torch.tensor([0, 0, 2]), 3)
    assert means.tolist() == pytest.approx([8 / 3, 0.0, 1.0]) and present.tolist() == [True, False, True]
    assert Balancer("equal", ["a", "b", "c"]).combine(means, present).item() == pytest.approx((8 / 3 + 1) / 2)
    u = Balancer("uncertainty", ["a", "b", "c"])
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([math.log(2.0), 5.0, 0.0]))
    # mean over present groups of exp(-s) L + s: (8/3 / 2 + ln 2 + 1 + 0) / 2
    assert u.combine(means, present).item() == pytest.approx((4 / 3 + math.log(2) + 1) / 2)
    assert u.log_items()["balance/weight/a"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss_balancing"):
        Balancer("static", ["a"])


def test_uncertainty_learns_to_weigh_down_the_noisier_group():
    """s_g -> log L_g: the group with the larger loss ends with the smaller weight."""
    u = Balancer("uncertainty", ["big", "small"])
    opt = torch.optim.Adam([u.log_vars], lr=0.05)
    means, present = torch.tensor([4.0, 0.5]), torch.tensor([True, True])
    for _ in range(400):
        opt.zero_grad()
        u.combine(means, present).backward()
        opt.step()
    assert u.log_vars.detach().tolist() == pytest.approx([math.log(4.0), math.log(0.5)], abs=0.05)
    w = u.weights()
    assert w[0] < w[1]


def test_upgrad_step_conflicts_with_no_group():
    """Two groups whose gradients conflict: the plain mean step goes against one of them; the
    UPGrad step (torchjd) has a non-negative inner product with both, and its weights say so."""
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    g1, g2 = torch.tensor([1.0, 0.2]), torch.tensor([-1.0, 0.1])  # gradients of the two losses
    mean = (g1 + g2) / 2
    assert torch.dot(mean, g1) > 0
    b = Balancer("upgrad", ["a", "b"])
    means = torch.stack([g1 @ p, g2 @ p])  # linear losses: d(loss_i)/dp = g_i
    b.backward(means, torch.tensor([True, True]), [p], scale=1.0)
    step = p.grad
    assert torch.dot(step, g1) >= -1e-6 and torch.dot(step, g2) >= -1e-6
    assert set(b.last_weights) == {"a", "b"} and all(w > 0 for w in b.last_weights.values())
    assert b.last_grad_norms["a"] == pytest.approx(float(g1.norm()), rel=1e-4)
    # a conflicting pair with unequal norms: the mean conflicts with the small one, UPGrad does not
    p.grad = None
    h1, h2 = torch.tensor([4.0, 0.0]), torch.tensor([-1.0, 0.5])
    assert torch.dot((h1 + h2) / 2, h2) < 0
    b.backward(torch.stack([h1 @ p, h2 @ p]), torch.tensor([True, True]), [p], scale=1.0)
    assert torch.dot(p.grad, h2) >= -1e-6 and torch.dot(p.grad, h1) >= -1e-6
