import math

import pytest
import torch

from ambient.data.corruption import PATTERNS, Corruption, check_mask, sampling_masks


def binomial_bound(prob: float, n: int, z: float = 5.0) -> float:
    return z * math.sqrt(prob * (1 - prob) / n) + 1e-9


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("full_rgb", [False, True])
@pytest.mark.parametrize("p,delta", [(0.0, 0.0), (0.5, 0.1), (0.8, 0.5), (0.9, 0.1)])
def test_dust_statistics(p, delta, full_rgb):
    c = Corruption("dust", p, delta, mask_full_rgb=full_rgb)
    a = c.mask((64, 3, 16, 16), gen(1))
    a_hat = c.further(a, gen(2))
    n_draws = a[:, :1].numel() if full_rgb else a.numel()
    assert abs(a.mean().item() - (1 - p)) <= binomial_bound(1 - p, n_draws)
    keep = (1 - p) * (1 - delta)
    assert abs(a_hat.mean().item() - keep) <= binomial_bound(keep, n_draws)
    assert bool((a_hat <= a).all())
    if full_rgb:
        assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a_hat[:, 0] + (a - a_hat)[:, 0])
        assert torch.equal(a_hat[:, 0], a_hat[:, 2])
    elif p > 0:
        assert not torch.equal(a[:, 0], a[:, 1])


def test_dust_further_drops_observed_pixels_with_probability_delta():
    c = Corruption("dust", 0.3, 0.4)
    a = c.mask((32, 1, 32, 32), gen(3))
    a_hat = c.further(a, gen(4))
    dropped_share = 1 - a_hat.sum() / a.sum()
    assert abs(dropped_share.item() - 0.4) <= binomial_bound(0.4, int(a.sum()))


@pytest.mark.parametrize("h,w,p", [(16, 16, 0.5), (28, 28, 0.8), (10, 10, 0.3), (12, 20, 0.25)])
def test_box_removes_one_square_fully_inside(h, w, p):
    c = Corruption("box", p, 0.0)
    a = c.mask((50, 3, h, w), gen(5))
    sh, sw = math.ceil(round(p * h, 9)), math.ceil(round(p * w, 9))
    hidden = (1 - a[:, 0]).flatten(1).sum(1)
    assert torch.all(hidden == sh * sw)
    assert torch.equal(a[:, 0], a[:, 2])
    rows = (1 - a[:, 0]).amax(dim=2)  # rows that contain hidden pixels
    assert torch.all(rows.sum(1) == sh)
    # placement varies between images
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 1


def test_fixed_box_is_centred_and_identical():
    a = Corruption("fixed_box", 0.5, 0.0).mask((8, 1, 16, 16), gen(6))
    assert torch.equal(a[0], a[7])
    assert a[0, 0, 4:12, 4:12].sum() == 0 and a[0].sum() == 256 - 64


def test_keep_patch_keeps_one_square():
    h, p = 28, 0.7
    k = math.ceil(round((1 - p) * h, 9))
    a = Corruption("keep_patch", p, 0.0).mask((20, 1, h, h), gen(7))
    assert torch.all(a.flatten(1).sum(1) == k * k)


@pytest.mark.parametrize("pattern", ["box", "fixed_box", "keep_patch"])
def test_box_families_further_is_a_square_inside_the_observed_region(pattern):
    h, p, delta = 24, 0.5, 0.25
    c = Corruption(pattern, p, delta)
    a = c.mask((40, 2, h, h), gen(8))
    a_hat = c.further(a, gen(9))
    assert bool((a_hat <= a).all())
    removed = (a - a_hat)[:, 0].flatten(1).sum(1)
    if pattern == "keep_patch":
        k = math.ceil(round((1 - p) * h, 9))
        t = math.ceil(round(delta * k, 9))
        assert torch.all(removed == t * t)
    else:
        t = math.ceil(round(delta * h, 9))
        assert torch.all(removed <= t * t) and removed.float().mean() > 0
    assert torch.equal(a_hat[:, 0], a_hat[:, 1])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_expected_survival_matches_empirical(pattern):
    c = Corruption(pattern, 0.6, 0.3)
    h = w = 20
    a = c.mask((2000, 1, h, w), gen(10))
    a_hat = c.further(a, gen(11))
    assert abs(a.mean().item() - c.expected_survival(h, w)) < 0.01
    assert abs(a_hat.mean().item() - c.expected_further_survival(h, w)) < 0.01


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mask_is_pure_function_of_seed_and_index(pattern):
    c = Corruption(pattern, 0.5, 0.2)
    m1 = c.mask_for_index(seed=3, index=17, shape=(3, 12, 12))
    c.mask((4, 3, 12, 12), gen(0))  # unrelated draws in between change nothing
    m2 = c.mask_for_index(seed=3, index=17, shape=(3, 12, 12))
    assert torch.equal(m1, m2)
    batch = c.masks_for_indices(3, [5, 17, 9], (3, 12, 12))
    assert torch.equal(batch[1], m1)
    others = [c.mask_for_index(3, i, (3, 12, 12)) for i in range(18, 26)]
    others += [c.mask_for_index(4, 17, (3, 12, 12))]
    if pattern != "fixed_box":
        assert any(not torch.equal(m1, o) for o in others)
    # the paper's fixed further mask is reproducible too, and a subset of A
    f1 = c.further_for_indices(3, [5, 17], batch[:2])
    f2 = c.further_for_indices(3, [5, 17], batch[:2])
    assert torch.equal(f1, f2) and bool((f1 <= batch[:2]).all())


def test_sampling_masks_survival_and_per_seed():
    c = Corruption("dust", 0.8, 0.1)
    seeds = list(range(200))
    m = sampling_masks(c, (200, 1, 16, 16), seeds)
    keep = 0.2 * 0.9
    assert abs(m.mean().item() - keep) <= binomial_bound(keep, m.numel())
    single = sampling_masks(c, (1, 1, 16, 16), [seeds[37]])
    assert torch.equal(single[0], m[37])
    data = sampling_masks(c, (200, 1, 16, 16), seeds, data_survival=0.5)
    assert abs(data.mean().item() - 0.45) <= binomial_bound(0.45, data.numel())


@pytest.mark.parametrize("kwargs,needle", [
    (dict(p=1.0), "corruption probability"),
    (dict(p=-0.1), "corruption probability"),
    (dict(p=float("nan")), "corruption probability"),
    (dict(delta=1.0), "delta"),
    (dict(delta=1.5), "delta"),
    (dict(pattern="blur"), "pattern"),
])
def test_bad_parameters(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Corruption(**kwargs)


def test_bad_masks():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="mask_hat"):
        check_mask(torch.full_like(x, 0.5), x, "mask_hat")
    with pytest.raises(ValueError, match="shape"):
        check_mask(torch.ones(2, 1, 4, 5), x)
    with pytest.raises(ValueError, match="mask"):
        Corruption("dust", 0.5, 0.5).further(torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="shape"):
        Corruption().mask((2, 4, 4))


def _hole_corners(masks: torch.Tensor, side: int) -> list[tuple[int, int]]:
    """Top-left corner of the side × side zero square of each (1, h, w) mask (a lone box)."""
    out = []
    for m in masks[:, 0]:
        rows, cols = torch.nonzero(m == 0, as_tuple=True)
        assert len(rows) == side * side
        out.append((int(rows.min()), int(cols.min())))
    return out


def test_box_further_of_as_size_makes_the_two_boxes_exchangeable():
    """With δ = p, A's box and Ã's further box are i.i.d. uniform squares of one size, so given two
    disjoint holes in Ã each is A's with probability 1/2: every hidden pixel may be graded (learnt)."""
    h = w = 10
    law = Corruption("box", 0.3, 0.3)  # two 3×3 boxes
    g = gen(5)
    a = law.mask((4000, 1, h, w), g)
    b = Corruption("box", 0.3, 0.0).mask((4000, 1, h, w), g)  # what further() removes, drawn the same way
    first, second = _hole_corners(a, 3), _hole_corners(b, 3)
    for axis in (0, 1):  # same marginal law of the corner, position by position
        ca = torch.bincount(torch.tensor([c[axis] for c in first]), minlength=8).double() / 4000
        cb = torch.bincount(torch.tensor([c[axis] for c in second]), minlength=8).double() / 4000
        assert (ca - 1 / 8).abs().max() < 0.03 and (cb - 1 / 8).abs().max() < 0.03
    assert law.unlearnt_hole(h, w) is None
    # further() removes one square of A's size per image (where it does not overlap A's)
    a_hat = law.further(a, gen(6))
    removed = ((a == 1) & (a_hat == 0)).flatten(1).sum(1)
    assert int(removed.max()) == 9 and bool((removed <= 9).all())


@pytest.mark.parametrize("pattern,p,delta,needle", [
    ("box", 0.5, 0.2, "6×6 but A's is 14×14"), ("box", 0.5, 0.7, "20×20 but A's is 14×14"),
    ("fixed_box", 0.5, 0.5, "centre"), ("keep_patch", 0.5, 0.2, "outside its patch")])
def test_laws_that_never_teach_some_hidden_pixels_are_named(pattern, p, delta, needle):
    assert needle in Corruption(pattern, p, delta).unlearnt_hole(28, 28)
    assert Corruption("dust", p, delta).unlearnt_hole(28, 28) is None
    assert Corruption("box", p, p).unlearnt_hole(28, 28) is None
