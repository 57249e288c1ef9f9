import pytest
import torch

from nodulekit.models.checkpoint import atomic_torch_save, load_cls_model, load_seg_model, save_seg_checkpoint
from nodulekit.models.classifier import LunaModel
from nodulekit.models.unet import SegModel, UNetWidths, widths_from_state_dict
from nodulekit.errors import InputError


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_seg_parameter_count():
    assert n_params(SegModel()) == 118_271


def test_classifier_parameter_count():
    assert n_params(LunaModel()) == 222_220


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_seg_output_shape(hw):
    out = SegModel().eval()(torch.randn(2, 7, *hw))
    assert out.shape == (2, 1, *hw)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


UNEVEN = UNetWidths(down=((9, 11), (17, 23), (40, 29)), up=((13, 10, 12), (7, 5, 6)))


def _dlwpt_checkpoint(model, path):
    # dlwpt-code's layout: model_state plus bookkeeping, no widths
    torch.save({"sys_argv": ["x"], "time": "t", "model_name": "UNetWrapper", "model_state": model.state_dict(),
                "optimizer_name": "Adam", "optimizer_state": {}, "epoch": 3, "totalTrainingSamples_count": 10}, path)


@pytest.mark.parametrize("widths", [UNetWidths.default(), UNEVEN], ids=["default", "uneven"])
def test_dlwpt_seg_checkpoint_loads_identically(tmp_path, widths):
    torch.manual_seed(0)
    src = SegModel(widths)
    for m in src.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    src.eval()
    path = tmp_path / "seg.state"
    _dlwpt_checkpoint(src, path)
    loaded, _ = load_seg_model(path)
    assert loaded.widths == widths
    x = torch.randn(1, 7, 32, 32) * 500
    assert torch.equal(src(x), loaded(x))


def test_widths_round_trip():
    assert widths_from_state_dict(SegModel(UNEVEN).state_dict()) == UNEVEN
    assert UNetWidths.from_dict(UNEVEN.to_dict()) == UNEVEN


def test_dlwpt_classifier_checkpoint_loads_identically(tmp_path):
    torch.manual_seed(0)
    src = LunaModel().eval()
    torch.nn.init.normal_(src.head_linear.weight, std=0.05)  # a fresh head is zero: give it weights
    path = tmp_path / "cls.state"
    torch.save({"model_name": "LunaModel", "model_state": src.state_dict(), "epoch": 1}, path)
    loaded, _ = load_cls_model(path)
    x = torch.randn(2, 1, 32, 48, 48) * 300
    out = loaded(x)[0]
    assert torch.equal(src(x)[0], out) and out.abs().max() > 0
    assert loaded.crop_spacing is None  # dlwpt trained on native-voxel crops


def test_classifier_checkpoint_keeps_its_crop_spacing(tmp_path):
    from nodulekit.models.checkpoint import save_cls_checkpoint

    save_cls_checkpoint(tmp_path / "cls.pt", LunaModel(crop_spacing=(1.25, 0.8, 0.8)))
    assert load_cls_model(tmp_path / "cls.pt")[0].crop_spacing == (1.25, 0.8, 0.8)
    save_cls_checkpoint(tmp_path / "native.pt", LunaModel())
    assert load_cls_model(tmp_path / "native.pt")[0].crop_spacing is None


def test_fresh_classifier_starts_at_chance_and_its_relus_are_alive():
    """The head starts at zero (loss ln 2, no early overconfidence) and the conv biases are
    centred on zero (dlwpt's normal_(b, -bound, bound) centres them on -bound)."""
    torch.manual_seed(0)
    m = LunaModel().train()
    x = torch.randn(8, 1, 32, 48, 48) * 400 - 500
    logits, probs = m(x)
    assert torch.allclose(probs, torch.full_like(probs, 0.5))
    biases = torch.cat([m.get_submodule(f"block{i}.conv{j}").bias.detach() for i in range(1, 5) for j in (1, 2)])
    assert abs(float(biases.mean())) < 0.02
    assert float(m.features(x).gt(0).float().mean()) > 0.2


def test_training_batch_norms_fold_into_the_dlwpt_layout(tmp_path):
    """A classifier trained with batch norms (``norm=True``) folds into the plain layout with the
    same outputs in eval mode (float32 rounding: 1e-4 of the logits' scale), and a checkpoint that
    still holds them loads folded."""
    from nodulekit.models.checkpoint import save_cls_checkpoint

    torch.manual_seed(0)
    m = LunaModel(norm=True).train()
    torch.nn.init.normal_(m.head_linear.weight, std=0.05)
    x = torch.randn(4, 1, 32, 48, 48) * 400 - 300
    with torch.no_grad():
        for _ in range(3):  # running statistics off their start (momentum 0.1)
            m(x)
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm3d) and mod is not m.tail_batchnorm):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    m.eval()
    plain = m.folded()
    assert not plain.norm and set(plain.state_dict()) == set(LunaModel().state_dict())
    assert n_params(plain) == 222_220
    want = m(x)[0]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(plain(x)[0], want, rtol=0, atol=1e-4 * float(want.abs().max()))
    save_cls_checkpoint(tmp_path / "last.pt", m)
    loaded, _ = load_cls_model(tmp_path / "last.pt")
    assert not loaded.norm
    torch.testing.assert_close(loaded(x)[0], want, rtol=0, atol=1e-4 * float(want.abs().max()))
    assert LunaModel().folded().norm is False


def test_wrong_shape_checkpoint_is_named(tmp_path):
    good = SegModel()
    save_seg_checkpoint(tmp_path / "a.pt", good)
    state = good.state_dict()
    state["unet.last.weight"] = torch.zeros(1, 5, 1, 1)
    atomic_torch_save({"widths": good.widths.to_dict(), "model_state": state}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="bad.pt: tensor 'unet.last.weight' has shape"):
        load_seg_model(tmp_path / "bad.pt")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "obj": object()}, path)
    with pytest.raises(InputError, match="evil.pt: not a readable checkpoint"):
        load_seg_model(path)


def test_missing_and_truncated_checkpoint(tmp_path):
    with pytest.raises(InputError, match="checkpoint file not found"):
        load_seg_model(tmp_path / "nope.pt")
    save_seg_checkpoint(tmp_path / "t.pt", SegModel())
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.pt: not a readable checkpoint"):
        load_seg_model(tmp_path / "t.pt")


def test_atomic_torch_save_replaces_whole_files_and_leaves_none_on_error(tmp_path):
    path = atomic_torch_save({"a": torch.ones(2)}, tmp_path / "d" / "x.pt")
    atomic_torch_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Unsaveable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]
