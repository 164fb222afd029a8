"""Test-time augmentation and explanation maps (attention rollout, Grad-CAM, overlays)."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from sklearn.metrics import accuracy_score

from pipelines.evaluation.explain import (
    attention_rollout,
    explain_examples,
    grad_cam,
    last_conv_layer,
    save_overlay,
)
from pipelines.evaluation.tta import run_tta_table, tta_predict, tta_views


class TinyCNN(torch.nn.Module):
    """Conv -> ReLU -> 1x1 conv -> ReLU -> global average pool -> linear."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 8, 1),
            torch.nn.ReLU(inplace=True),
        )
        self.head = torch.nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


class TinyViT(torch.nn.Module):
    """Patch embedding + [CLS] + MONAI TransformerBlocks with saved attention."""

    def __init__(self, image_size=(16, 16), patch: int = 4, hidden: int = 16, depth: int = 2, n_classes: int = 3):
        super().__init__()
        self.feature_grid = (image_size[0] // patch, image_size[1] // patch)
        n_tokens = 1 + self.feature_grid[0] * self.feature_grid[1]
        self.embed = torch.nn.Conv2d(1, hidden, patch, stride=patch)
        self.cls = torch.nn.Parameter(0.02 * torch.randn(1, 1, hidden))
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, n_tokens, hidden))
        self.blocks = torch.nn.ModuleList(
            [TransformerBlock(hidden, 2 * hidden, num_heads=2, save_attn=True) for _ in range(depth)]
        )
        self.head = torch.nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.head(tokens[:, 0])


class _FixedAttention(torch.nn.Module):
    def __init__(self, att: torch.Tensor) -> None:
        super().__init__()
        self.fixed = att
        self.att_mat = torch.Tensor()


class _FixedBlock(torch.nn.Module):
    def __init__(self, att: torch.Tensor) -> None:
        super().__init__()
        self.attn = _FixedAttention(att)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.attn.att_mat = self.attn.fixed.expand(t.shape[0], -1, -1, -1)
        return t


class FixedAttentionModel(torch.nn.Module):
    """One block whose [CLS] token attends only to grid token (row 0, col 3) of a 2x4 grid."""

    def __init__(self) -> None:
        super().__init__()
        att = torch.eye(9).reshape(1, 1, 9, 9).repeat(1, 2, 1, 1)
        att[:, :, 0] = 0.0
        att[:, :, 0, 1 + 3] = 1.0
        self.blocks = torch.nn.ModuleList([_FixedBlock(att)])
        self.feature_grid = (2, 4)
        self.head = torch.nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.blocks[0](torch.zeros(x.shape[0], 9, 1))
        return self.head(x.mean(dim=(1, 2, 3))[:, None])


def _loader(n: int = 12, size: int = 16, n_classes: int = 3, batch_size: int = 4):
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, size, size, generator=g), "label": torch.tensor(i % n_classes)} for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(("policy", "n_views"), [("none", 1), ("hflip", 2), ("5crop", 5), ("hflip+5crop", 10)])
def test_tta_policies_give_views_of_the_input_shape(policy, n_views):
    x = torch.rand(2, 1, 16, 12)
    views = tta_views(x, policy)
    assert len(views) == n_views
    assert all(v.shape == x.shape for v in views)
    probs = tta_predict(TinyCNN(), x, policy)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_centre_crop_view_is_resized_centre_region():
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16)
    centre = tta_views(x, "5crop", crop_fraction=0.75)[4]
    expected = F.interpolate(x[..., 2:14, 2:14], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(centre, expected)
    top_right = tta_views(x, "5crop", crop_fraction=0.75)[1]
    assert top_right[0, 0, 0, -1] == pytest.approx(x[0, 0, 0, -1].item(), abs=1e-4)


def test_hflip_tta_of_flip_invariant_model_changes_nothing():
    model = TinyCNN()
    with torch.no_grad():  # a left-right symmetric kernel + global pooling make the network flip invariant
        conv = model.features[0].weight
        conv.copy_((conv + conv.flip(-1)) / 2)
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(tta_predict(model, x, "hflip"), tta_predict(model, x, "none"))
    torch.testing.assert_close(tta_predict(model, x, "hflip+5crop"), tta_predict(model, x, "5crop"))


def test_full_size_crops_equal_no_tta():
    model = TinyCNN()
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(tta_predict(model, x, "5crop", crop_fraction=1.0), tta_predict(model, x, "none"))


def test_unknown_policy_raises_value_error():
    with pytest.raises(ValueError, match="unknown TTA policy"):
        tta_views(torch.rand(1, 1, 8, 8), "rotate90")


def test_run_tta_table_reports_metrics_of_each_policy():
    model, loader = TinyCNN(), _loader()
    table = run_tta_table(model, loader, ["a", "b", "c"], ["none", "hflip+5crop"], "cpu")
    assert list(table.columns) == ["policy", "n_views", "accuracy", "macro_f1", "macro_auc", "ms_per_image"]
    assert table["policy"].tolist() == ["none", "hflip+5crop"]
    assert table["n_views"].tolist() == [1, 10]
    with torch.no_grad():
        preds = torch.cat([model(b["image"]).argmax(1) for b in loader]).numpy()
    labels = np.arange(12) % 3
    assert table.loc[0, "accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert (table["ms_per_image"] > 0).all()


def test_rollout_maps_have_input_size_and_sum_to_one():
    model = TinyViT(image_size=(16, 24))
    x = torch.rand(3, 1, 16, 24)
    maps = attention_rollout(model, x)
    assert maps.shape == (3, 1, 16, 24)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, 1))


def test_rollout_reads_grid_tokens_in_row_major_order():
    maps = attention_rollout(FixedAttentionModel(), torch.rand(1, 1, 20, 40))
    row, col = np.unravel_index(int(maps[0, 0].argmax()), (20, 40))
    assert row < 10 and col >= 30  # token (row 0, col 3) of the 2x4 grid: top-right tile


def test_rollout_without_saved_attention_raises_value_error():
    model = TinyViT()
    model.blocks = torch.nn.ModuleList([TransformerBlock(16, 32, num_heads=2, save_attn=False)])
    with pytest.raises(ValueError, match="save_attn=True"):
        attention_rollout(model, torch.rand(1, 1, 16, 16))


def test_grad_cam_highlights_the_bright_region_and_leaves_no_hooks():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model(torch.zeros(1, 1, 8, 8))
        model[2].weight.fill_(1.0)
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 1:3, 1:3] = 1.0
    x[1, 0, 5:7, 4:6] = 1.0
    maps = grad_cam(model, x, target_layer="0", class_idx=1)
    assert maps.shape == (2, 1, 8, 8)
    assert maps.min() >= 0 and maps.max() <= 1
    assert np.unravel_index(int(maps[0, 0].argmax()), (8, 8)) in {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert np.unravel_index(int(maps[1, 0].argmax()), (8, 8)) in {(5, 4), (5, 5), (6, 4), (6, 5)}
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_grad_cam_with_unknown_layer_raises_value_error():
    with pytest.raises(ValueError, match="features.9"):
        grad_cam(TinyCNN(), torch.rand(1, 1, 8, 8), target_layer="features.9")


def test_last_conv_layer_is_found_by_name():
    assert last_conv_layer(TinyCNN()) == "features.2"


def test_save_overlay_writes_three_panel_png(tmp_path):
    path = save_overlay(np.random.rand(16, 16), np.random.rand(16, 16), tmp_path / "o.png", "title")
    img = mpimg.imread(path)
    assert img.shape[1] > 2 * img.shape[0]


def test_explain_examples_writes_per_class_overlays_with_grad_cam_for_a_cnn(tmp_path):
    paths = explain_examples(TinyCNN(), _loader(), ["CN", "MCI", "AD"], tmp_path, per_class=2, method="auto")
    assert [p.name for p in paths] == ["CN_0.png", "CN_1.png", "MCI_0.png", "MCI_1.png", "AD_0.png", "AD_1.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_explain_examples_uses_rollout_for_a_transformer(tmp_path, monkeypatch):
    import pipelines.evaluation.explain as explain

    calls = []

    def fake_rollout(model, images):
        calls.append(tuple(images.shape))
        return torch.rand(len(images), 1, 16, 16)

    monkeypatch.setattr(explain, "attention_rollout", fake_rollout)
    paths = explain_examples(TinyViT(), _loader(), ["CN", "MCI", "AD"], tmp_path, per_class=1, method="auto")
    assert [p.name for p in paths] == ["CN_0.png", "MCI_0.png", "AD_0.png"]
    assert calls == [(3, 1, 16, 16)]


def test_explain_examples_reads_a_map_style_dataset(tmp_path):
    dataset = list(_loader(n=6, batch_size=1).dataset)
    paths = explain_examples(TinyViT(), dataset, ["a", "b", "c"], tmp_path, per_class=1, method="rollout")
    assert [p.name for p in paths] == ["a_0.png", "b_0.png", "c_0.png"]
