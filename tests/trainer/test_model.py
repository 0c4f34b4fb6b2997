import timm
import torch

from kmim.trainer.config import ModelConfig
from kmim.trainer.model import MaskedImageModel


def test_random_masking_keeps_a_quarter_and_restores_order():
    model = MaskedImageModel(ModelConfig(), num_tokens=16)
    x = torch.arange(2 * 64 * 3, dtype=torch.float32).reshape(2, 64, 3)
    kept, mask, ids_restore = model.random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert kept.shape == (2, 16, 3) and mask.shape == (2, 64) and mask.sum(1).tolist() == [48, 48]
    for n in range(2):  # the kept patches are exactly the unmasked ones
        assert (
            sorted((kept[n, :, 0].div(3).long() - 64 * n).tolist())
            == torch.nonzero(mask[n] == 0).flatten().tolist()
        )
    latent, mask2, _ = model.forward_encoder(
        torch.randn(2, 3, 32, 32), 0.75, torch.Generator().manual_seed(0)
    )
    assert latent.shape == (2, 1 + 16, 64) and torch.equal(mask, mask2)


def test_token_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    model = MaskedImageModel(ModelConfig(), num_tokens=16).eval()
    imgs, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 16, (2, 64))
    _, mask, _ = model.forward_encoder(imgs, 0.75, torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[mask == 0] = (changed[mask == 0] + 1) % 16  # alter the targets of visible patches only
    a = model(imgs, tokens, torch.Generator().manual_seed(1))
    b = model(imgs, changed, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    changed[mask == 1] = (changed[mask == 1] + 1) % 16
    assert not torch.equal(a, model(imgs, changed, torch.Generator().manual_seed(1)))


def test_pixel_target_and_any_timm_vit_encoder():
    model = MaskedImageModel(ModelConfig(target="pixel"), num_tokens=None)
    assert model(torch.randn(2, 3, 32, 32)).item() > 0
    cfg = ModelConfig(
        encoder="test_vit", image_size=32, patch_size=16, decoder_embed_dim=32, decoder_num_heads=2
    )
    model = MaskedImageModel(cfg, num_tokens=8)
    assert model(torch.randn(2, 3, 32, 32), torch.randint(0, 8, (2, 4))).isfinite()
    assert isinstance(timm.create_model("vit_micro_patch4_32"), timm.models.VisionTransformer)
