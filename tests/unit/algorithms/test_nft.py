"""DiffusionNFT's loss against plain arithmetic, its closed forms, its schedules, and the stored-LoRA swap."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dagcli.algorithms import nft
from dagcli.algorithms.nft_settings import NftConfig, check_nft, old_policy_decay
from dagcli.kernels import ddim, forward
from dagcli.models import blend_lora, lora_swapped, lora_tensors

# two samples of two latent dimensions
X0 = [[1.0, -2.0], [0.0, 1.0]]
EPS = [[0.5, 1.0], [-1.0, 2.0]]
T = [0.5, 0.25]
V = [[0.3, -0.1], [-0.5, 0.5]]
V_OLD = [[0.1, 0.2], [-0.2, 0.7]]
V_REF = [[0.0, 0.4], [-0.4, 0.6]]
R = [0.8, 0.3]


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _by_hand(lam: float, kl_weight: float, adv_clip: float, floor: float = 1e-5) -> list[float]:
    """The per-sample loss with plain Python floats, one dimension at a time."""
    out = []
    for x0, eps, t, v, vo, vr, r in zip(X0, EPS, T, V, V_OLD, V_REF, R, strict=True):
        d = len(x0)
        xt = [(1 - t) * a + t * e for a, e in zip(x0, eps, strict=True)]
        pos = [(1 - lam) * o + lam * c for o, c in zip(vo, v, strict=True)]
        neg = [(1 + lam) * o - lam * c for o, c in zip(vo, v, strict=True)]
        errs = []
        for mix in (pos, neg):
            diff = [x - t * m - a for x, m, a in zip(xt, mix, x0, strict=True)]
            w = max(sum(abs(q) for q in diff) / d, floor)
            errs.append(sum(q * q for q in diff) / d / w)
        kl = sum((c - f) ** 2 for c, f in zip(v, vr, strict=True)) / d
        out.append(adv_clip * (r * errs[0] + (1 - r) * errs[1]) / lam + kl_weight * kl)
    return out


def _loss(v=None, v_old=None, r=None, **settings):
    s = NftConfig(**settings)
    return nft.flow_nft_loss(_t(X0), _t(EPS), _t(T), _t(V) if v is None else v, _t(V_OLD) if v_old is None else v_old,
                             _t(V_REF), _t(R) if r is None else r, s)


@pytest.mark.parametrize("lam,kl_weight,adv_clip", [(1.0, 1e-4, 5.0), (0.5, 0.1, 5.0), (0.1, 0.0, 2.0)])
def test_loss_matches_plain_arithmetic(lam, kl_weight, adv_clip):
    loss, logs = _loss(strength=lam, kl_weight=kl_weight, adv_clip=adv_clip)
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx(_by_hand(lam, kl_weight, adv_clip), rel=1e-6)
    assert ("kl_loss" in logs) == (kl_weight > 0)


def test_one_sample_by_hand():
    """Sample 0 at λ = 1, no KL, worked on paper: x_t = (0.75, −0.5), v⁺ = v_θ = (0.3, −0.1), v⁻ = 2·v_old − v_θ
    = (−0.1, 0.5); x̂0⁺ − x0 = (−0.4, 1.55), x̂0⁻ − x0 = (−0.2, 1.25)."""
    err_pos = (0.4**2 + 1.55**2) / 2 / ((0.4 + 1.55) / 2)
    err_neg = (0.2**2 + 1.25**2) / 2 / ((0.2 + 1.25) / 2)
    loss, _ = _loss(strength=1.0, kl_weight=0.0)
    assert float(loss[0]) == pytest.approx(5.0 * (0.8 * err_pos + 0.2 * err_neg), rel=1e-6)


def test_weight_floor_when_prediction_is_exact():
    x0 = _t([[1.0, 2.0]])
    w = nft.adaptive_weight(x0.clone(), x0, 1e-5)
    assert w.dtype == torch.float64 and w.tolist() == [1e-5]
    assert nft.weighted_error(x0 + _t([[0.5, -0.5]]), x0, 1e-5).tolist() == pytest.approx([0.25 / 0.5])


def test_equal_policies_make_the_branches_equal_and_the_gradient_closed_form():
    """v_θ = v_old: v⁺ = v⁻ = v_old, so both errors agree and the loss does not depend on r; the gradient of the
    policy term is adv_clip·2·t·(1 − 2r)·e / (w·D) with e = x̂0 − x0, the same for every λ."""
    grads = []
    for lam in (1.0, 0.3):
        v = _t(V_OLD).requires_grad_(True)
        loss, logs = _loss(v=v, strength=lam, kl_weight=0.0)
        assert float(logs["positive_error"]) == pytest.approx(float(logs["negative_error"]), rel=1e-6)
        loss.sum().backward()
        grads.append(v.grad)
    for i, (x0, eps, t, vo, r) in enumerate(zip(X0, EPS, T, V_OLD, R, strict=True)):
        e = [(1 - t) * a + t * n - t * o - a for a, n, o in zip(x0, eps, vo, strict=True)]
        w = sum(abs(q) for q in e) / 2
        expected = [5.0 * 2 * t * (1 - 2 * r) * q / (w * 2) for q in e]
        for g in grads:
            assert g[i].tolist() == pytest.approx(expected, rel=1e-5)
    flat = [_loss(v=_t(V_OLD), r=_t([p, p]), kl_weight=0.0)[0] for p in (0.0, 0.4, 1.0)]
    assert torch.allclose(flat[0], flat[1]) and torch.allclose(flat[0], flat[2])


def test_half_probability_and_equal_policies_give_zero_gradient():
    v = _t(V_OLD).requires_grad_(True)
    loss, _ = _loss(v=v, r=_t([0.5, 0.5]), kl_weight=0.0)
    loss.sum().backward()
    assert v.grad.abs().max() < 1e-6


def test_only_the_current_output_is_differentiated():
    v = _t(V).requires_grad_(True)
    v_old, r = _t(V_OLD).requires_grad_(True), _t(R).requires_grad_(True)
    loss, _ = _loss(v=v, v_old=v_old, r=r)
    loss.sum().backward()
    assert v.grad is not None and v_old.grad is None and r.grad is None


def test_kl_gradient_is_closed_form():
    """r = ½ at v_θ = v_old zeroes the policy gradient, so only the KL's remains: ∂/∂v_θ = 2·kl_weight·(v_θ − v_ref)/D."""
    v = _t(V_OLD).requires_grad_(True)
    loss, _ = _loss(v=v, r=_t([0.5, 0.5]), kl_weight=0.1)
    loss.sum().backward()
    expected = [[2 * 0.1 * (a - b) / 2 for a, b in zip(vo, vr, strict=True)] for vo, vr in zip(V_OLD, V_REF, strict=True)]
    assert v.grad.flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-6)


def test_optimality_probability_by_hand():
    """One group (1, 2, 3) and one (5, 5): global std of all five, the flat group at ½, ±adv_clip at 1 and 0."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    mean = sum(rewards.tolist()) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards.tolist()) / 5)
    a = 1.0 / (std + 1e-4)
    r = nft.optimality_probability(rewards, groups, "global", 1e-4, 5.0)
    assert r.tolist() == pytest.approx([0.5 - a / 10, 0.5, 0.5 + a / 10, 0.5, 0.5], rel=1e-6)
    clipped = nft.optimality_probability(rewards, groups, "group", 1e-4, 1.0)
    assert clipped.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.5])
    assert nft.to_probability(torch.tensor([-9.0, 2.5, 9.0]), 5.0).tolist() == [0.0, 0.75, 1.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_coefficients_match_the_ddim_kernel(prediction_type):
    ab = torch.tensor([0.95, 0.36], dtype=torch.float64)
    schedule = ddim.Schedule(alphas_cumprod=ab, final_alpha_cumprod=0.99, timesteps=torch.tensor([1, 0]),
                             step_ratio=1, prediction_type=prediction_type)
    x0, eps, out = (torch.randn(2, 3, generator=torch.Generator().manual_seed(k)) for k in (1, 2, 3))
    xt = forward.vp_noised(x0, eps, ab.float())
    a, b = forward.x0_coefficients(prediction_type, ab)
    expected = ddim.pred_x0_from_eps(schedule, xt, torch.tensor([0, 1]), out)
    assert torch.allclose(nft.predict_x0(xt, a, b, out), expected, atol=1e-6)


def test_vp_coefficients_recover_x0_from_the_true_output():
    ab = torch.tensor([0.9, 0.2], dtype=torch.float64)
    x0, eps = (torch.randn(2, 4, generator=torch.Generator().manual_seed(k)) for k in (4, 5))
    xt = forward.vp_noised(x0, eps, ab.float())
    v_true = ab.sqrt().float()[:, None] * eps - (1 - ab).sqrt().float()[:, None] * x0
    for kind, out in (("epsilon", eps), ("v_prediction", v_true)):
        assert torch.allclose(nft.predict_x0(xt, *forward.x0_coefficients(kind, ab), out), x0, atol=1e-5)
    t = torch.tensor([0.7, 0.1])
    xt = forward.flow_noised(x0, eps, t)
    assert torch.allclose(nft.predict_x0(xt, *forward.x0_coefficients("flow", t), eps - x0), x0, atol=1e-6)
    with pytest.raises(ValueError, match="valid options: flow, epsilon, v_prediction"):
        forward.x0_coefficients("sample", t)


@pytest.mark.parametrize("prediction_type,level", [("flow", [0.6, 0.2]), ("epsilon", [0.9, 0.05]),
                                                  ("v_prediction", [0.5, 0.3])])
def test_mixing_outputs_mixes_the_x0_predictions(prediction_type, level):
    """x̂0 is affine in the output with weights summing to one, so v± carry over to every prediction type."""
    g = torch.Generator().manual_seed(6)
    xt, out, old = (torch.randn(2, 5, generator=g) for _ in range(3))
    a, b = forward.x0_coefficients(prediction_type, torch.tensor(level, dtype=torch.float64))
    pos, neg = nft.implicit_policies(out, old, 0.4)
    x_out, x_old = nft.predict_x0(xt, a, b, out), nft.predict_x0(xt, a, b, old)
    assert torch.allclose(nft.predict_x0(xt, a, b, pos), 0.6 * x_old + 0.4 * x_out, atol=1e-5)
    assert torch.allclose(nft.predict_x0(xt, a, b, neg), 1.4 * x_old - 0.4 * x_out, atol=1e-5)


def test_old_policy_decay_schedules():
    assert [old_policy_decay(s, 0, 0.001, 0.5) for s in (0, 100, 499, 2000)] == pytest.approx([0, 0.1, 0.499, 0.5])
    assert [old_policy_decay(s, 75, 0.0075, 0.999) for s in (0, 74, 75, 175, 500)] == pytest.approx(
        [0, 0, 0, 0.75, 0.999])


def test_settings_defaults_are_valid_and_bad_ones_are_named():
    assert check_nft(NftConfig()) == []
    errors = check_nft(NftConfig(strength=0.0, std="batch", group_size=1))
    assert len(errors) == 3 and any("nft.std = 'batch': valid options: global, group" in e for e in errors)


# --- the sampling policy as stored LoRA weights ---------------------------------------------------------
@pytest.fixture(scope="module")
def lora_unet():
    from dagcli.builtin.random_models import build_tiny_random_pipeline
    from dagcli.config import LoraConfig
    from dagcli.models import add_lora

    unet = build_tiny_random_pipeline(seed=0).unet
    return add_lora(unet, LoraConfig(target_modules=("to_q", "to_k", "to_v", "to_out.0")), seed=0)


def _unet_inputs(unet):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 3, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([500, 100]), cond


def _perturbed(tensors: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in tensors.items()}


def test_swap_restores_bit_exact_weights_and_matches_a_model_built_with_them(lora_unet):
    unet = lora_unet
    own = lora_tensors(unet)
    assert own and all("lora_" in n for n in own)
    old = _perturbed(own, 1)
    x, t, cond = _unet_inputs(unet)
    built = copy.deepcopy(unet)
    with torch.no_grad():
        for n, p in built.named_parameters():
            if n in old:
                p.copy_(old[n])
        expected = built(x, t, cond).sample
        with lora_swapped(unet, old):
            assert all(torch.equal(p, old[n]) for n, p in unet.named_parameters() if n in old)
            under = unet(x, t, cond).sample
        after = unet(x, t, cond).sample
    assert torch.equal(under, expected)
    assert not torch.equal(after, expected)
    assert all(torch.equal(p, own[n]) for n, p in unet.named_parameters() if n in own)


def test_swap_before_the_trained_forward_leaves_gradients_unchanged(lora_unet):
    unet = lora_unet
    x, t, cond = _unet_inputs(unet)
    old = _perturbed(lora_tensors(unet), 2)

    def grads():
        unet.zero_grad(set_to_none=True)
        unet(x, t, cond).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain = grads()
    with torch.no_grad(), lora_swapped(unet, old):
        unet(x, t, cond)
    swapped = grads()
    assert plain.keys() == swapped.keys() and all(torch.equal(plain[n], swapped[n]) for n in plain)
    unet.zero_grad(set_to_none=True)
    out = unet(x, t, cond).sample.square().mean()
    with torch.no_grad(), lora_swapped(unet, old):
        pass
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    unet.zero_grad(set_to_none=True)


def test_blend_is_the_weighted_average_and_names_must_match(lora_unet):
    unet = lora_unet
    current = lora_tensors(unet)
    stored = _perturbed(current, 3)
    before = {n: v.clone() for n, v in stored.items()}
    blend_lora(stored, unet, 0.3)
    assert all(torch.allclose(stored[n], 0.3 * before[n] + 0.7 * current[n], atol=1e-7) for n in stored)
    blend_lora(stored, unet, 0.0)
    assert all(torch.equal(stored[n], current[n]) for n in stored)
    partial = dict(list(stored.items())[1:])
    with pytest.raises(ValueError, match="1 names differ"):
        with lora_swapped(unet, partial):
            pass
