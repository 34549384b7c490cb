import math

import pytest
import torch

from thumbalign.methods.bco import RewardShift, bco_loss


def log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


def test_bco_loss_matches_the_formula_by_hand():
    policy = torch.tensor([-10.0, -12.0, -8.0, -20.0])
    ref = torch.tensor([-11.0, -10.0, -8.5, -19.0])
    labels = torch.tensor([True, True, False, False])
    beta, delta = 0.1, 0.03
    out = bco_loss(policy, ref, labels, beta=beta, delta=delta)
    # r = β(π − ref): 0.1, -0.2, 0.05, -0.1
    expected = [-log_sigmoid(0.1 - 0.03), -log_sigmoid(-0.2 - 0.03),
                -log_sigmoid(-(0.05 - 0.03)), -log_sigmoid(-(-0.1 - 0.03))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.2, 0.05, -0.1], abs=1e-6)


def test_udm_weights_scale_thumbs_down_losses_only():
    policy, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    labels = torch.tensor([True, False])
    plain = bco_loss(policy, ref, labels, beta=0.5, delta=0.0).losses
    weighted = bco_loss(policy, ref, labels, beta=0.5, delta=0.0, weights=torch.tensor([3.0, 2.5])).losses
    assert weighted[0].item() == pytest.approx(plain[0].item())
    assert weighted[1].item() == pytest.approx(2.5 * plain[1].item())


def test_gradient_raises_thumbs_up_and_lowers_thumbs_down_log_probs():
    policy = torch.tensor([-5.0, -5.0, -5.0, -5.0], requires_grad=True)
    labels = torch.tensor([True, False, True, False])
    bco_loss(policy, torch.full((4,), -5.0), labels, beta=0.1, delta=0.0).losses.sum().backward()
    # gradient descent moves log-probs against the gradient
    assert (policy.grad[labels] < 0).all() and (policy.grad[~labels] > 0).all()
    # the reward shift is a constant: the gradient at r = δ is β·σ(0) = β/2 in size
    assert policy.grad.abs().tolist() == pytest.approx([0.05] * 4)


def test_one_class_batch_gives_finite_loss():
    for label in (True, False):
        out = bco_loss(torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([label]), beta=0.1, delta=0.2)
        assert torch.isfinite(out.losses).all()


def test_running_shift_is_the_pooled_mean_whatever_the_batching():
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 3.0])
    labels = torch.tensor([True, False, True, True, False, False, True])
    one, many = RewardShift("running"), RewardShift("running")
    one.update(rewards, labels)
    for lo, hi in [(0, 1), (1, 4), (4, 7)]:
        many.update(rewards[lo:hi], labels[lo:hi])
    expected = sum(rewards.tolist()) / 7
    assert one.value == pytest.approx(expected) and many.value == pytest.approx(expected)


def test_balanced_shift_is_the_midpoint_of_class_means():
    shift = RewardShift("balanced")
    shift.update(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([True, True, True]))
    assert shift.value == pytest.approx(2.0)  # one class seen so far: pooled mean
    shift.update(torch.tensor([-4.0]), torch.tensor([False]))
    assert shift.value == pytest.approx(0.5 * (2.0 + -4.0))
    assert RewardShift("running").value == 0.0


def test_shift_state_round_trips():
    shift = RewardShift("balanced")
    shift.update(torch.tensor([1.0, -2.0]), torch.tensor([True, False]))
    again = RewardShift("balanced")
    again.load_state_dict(shift.state_dict())
    assert again.value == shift.value and again.state_dict() == shift.state_dict()
    with pytest.raises(ValueError):
        RewardShift("running").load_state_dict(shift.state_dict())


def test_label_smoothing_mixes_in_the_other_labels_loss_by_hand():
    policy, ref = torch.tensor([-10.0, -20.0]), torch.tensor([-11.0, -19.0])
    labels = torch.tensor([True, False])
    eps, beta, delta = 0.2, 0.1, 0.03
    out = bco_loss(policy, ref, labels, beta=beta, delta=delta, weights=torch.tensor([1.0, 1.5]), label_smoothing=eps)
    z = [0.1 - 0.03, -0.1 - 0.03]  # r − δ
    expected = [-(1 - eps) * log_sigmoid(z[0]) - eps * log_sigmoid(-z[0]),
                1.5 * (-(1 - eps) * log_sigmoid(-z[1]) - eps * log_sigmoid(z[1]))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_label_smoothing_stops_the_push_at_one_minus_eps():
    eps, beta = 0.1, 0.5
    stop = math.log((1 - eps) / eps) / beta  # log-ratio where σ(βρ) = 1 − ε
    for rho, sign in [(stop - 1.0, -1), (stop + 1.0, +1)]:  # below: keep raising; past: pull back
        policy = torch.tensor([rho], requires_grad=True)
        bco_loss(policy, torch.zeros(1), torch.tensor([True]), beta=beta, delta=0.0,
                 label_smoothing=eps).losses.sum().backward()
        assert policy.grad.item() * sign > 0
    policy = torch.tensor([stop], requires_grad=True)
    bco_loss(policy, torch.zeros(1), torch.tensor([True]), beta=beta, delta=0.0,
             label_smoothing=eps).losses.sum().backward()
    assert policy.grad.item() == pytest.approx(0.0, abs=1e-6)


def test_label_smoothing_is_a_bco_setting_with_its_own_flag_and_bounds(capsys):
    from thumbalign.cli import main
    from thumbalign.errors import ConfigError
    from thumbalign.trainers.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    bco_group = capsys.readouterr().out.split("BCO settings (--method bco, bco-pair):")[1].split("settings (")[0]
    assert "--label-smoothing" in bco_group and "(default: 0.0)" in bco_group  # listed under BCO's own settings
    TrainConfig(data="x", method="bco-pair", label_smoothing=0.1).validate()
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 0.5\)"):
        TrainConfig(data="x", label_smoothing=0.5).validate()
    with pytest.raises(ConfigError, match="belong to BCO.*--label-smoothing"):
        TrainConfig(data="x", method="kto", label_smoothing=0.1).validate()
