"""The patch embedding equals patchcore-inspection's ``PatchCore._embed`` (ported literally below)."""

import pytest
import torch
import torch.nn.functional as F

from anomaly_core.patch_features import PatchEmbedder


def reference_embed(features, patchsize=3, pretrain_dim=1024, target_dim=1024, stride=1):
    """patchcore-inspection src/patchcore/patchcore.py::_embed + common.Preprocessing/Aggregator + PatchMaker."""
    padding = int((patchsize - 1) / 2)
    unfolder = torch.nn.Unfold(kernel_size=patchsize, stride=stride, padding=padding, dilation=1)
    patched, shapes = [], []
    for x in features:
        unfolded = unfolder(x)
        shapes.append([int((side + 2 * padding - 1 * (patchsize - 1) - 1) / stride + 1) for side in x.shape[-2:]])
        unfolded = unfolded.reshape(*x.shape[:2], patchsize, patchsize, -1).permute(0, 4, 1, 2, 3)
        patched.append(unfolded)
    ref = shapes[0]
    for i in range(1, len(patched)):
        f = patched[i].reshape(patched[i].shape[0], shapes[i][0], shapes[i][1], *patched[i].shape[2:])
        f = f.permute(0, -3, -2, -1, 1, 2)
        base = f.shape
        f = f.reshape(-1, *f.shape[-2:])
        f = F.interpolate(f.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False).squeeze(1)
        f = f.reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
        patched[i] = f.reshape(len(f), -1, *f.shape[-3:])
    flat = [x.reshape(-1, *x.shape[-3:]) for x in patched]
    pooled = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1) for x in flat]
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(len(stacked), -1)


@pytest.mark.parametrize("dims", [(1024, 1024), (256, 128)])
def test_matches_patchcore_inspection(dims):
    torch.manual_seed(0)
    maps = [torch.randn(2, 24, 8, 8), torch.randn(2, 40, 4, 4)]
    ours, grid = PatchEmbedder(3, *dims)(maps)
    assert grid == (8, 8)
    assert ours.shape == (2 * 64, dims[1])
    torch.testing.assert_close(ours, reference_embed(maps, 3, *dims), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stride", [2, 3])
def test_patch_stride_matches_patchcore_inspection(stride):
    """--patchstride: every stride-th neighbourhood, deeper layers resized onto the first layer's strided grid."""
    torch.manual_seed(0)
    maps = [torch.randn(2, 24, 9, 9), torch.randn(2, 40, 5, 5)]
    ours, grid = PatchEmbedder(3, 256, 128, stride=stride)(maps)
    side = (9 + 2 - 3) // stride + 1
    assert grid == (side, side) and ours.shape == (2 * side * side, 128)
    torch.testing.assert_close(ours, reference_embed(maps, 3, 256, 128, stride), rtol=0, atol=1e-6)


def test_embedding_is_local():
    """Changing one feature-map cell only changes embeddings of patches whose 3x3 window sees it."""
    torch.manual_seed(0)
    maps = [torch.randn(1, 8, 10, 10)]
    base, _ = PatchEmbedder(3, 64, 64)(maps)
    maps[0][0, :, 5, 5] += 10.0
    changed, _ = PatchEmbedder(3, 64, 64)(maps)
    moved = (base - changed).abs().sum(dim=1).reshape(10, 10) > 0
    assert moved.sum() == 9 and moved[4:7, 4:7].all()


def test_invalid_patch_size():
    with pytest.raises(ValueError, match="patch_size"):
        PatchEmbedder(patch_size=2)
