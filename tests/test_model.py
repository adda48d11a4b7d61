"""The model: trainable set, gradients, shapes, weight loading against the libraries' own forward passes."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2WithRegistersModel

from dcris.adapters import TextAdapter
from dcris.config import PRESETS, Config, preset
from dcris.model import build_model, is_trainable_key, split_output
from dcris.params import main as params_main
from dcris.text import TextEncoder, build_text_encoder
from dcris.vision import VisionEncoder, dinov2_position_embeddings, hf_vision_config, load_vision_backbone


def random_tokens(batch: int, length: int = 17, vocab: int = 49408, seed: int = 0) -> torch.Tensor:
    """Start token, random BPE ids, end token (the largest id), zero padding; varied lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, length - 1, (1,), generator=g))
        tokens[i, 0] = vocab - 2
        tokens[i, 1 : n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
        tokens[i, n + 1 if n + 1 < length else length - 1] = vocab - 1
    return tokens


@pytest.fixture(scope="module", params=["tiny-dcris", "tiny-detris"])
def tiny(request):
    torch.manual_seed(0)
    cfg = preset(request.param)
    return cfg, build_model(cfg.model, pretrained=False)


def test_only_adapters_and_head_train(tiny):
    _, model = tiny
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(is_trainable_key(n) for n in names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any(is_trainable_key(n) for n in frozen)
    assert any(".adapters." in n for n in names) and any(n.startswith("head.") for n in names)


def test_gradients_reach_every_adapter_and_head_parameter(tiny):
    cfg, model = tiny
    model.train()
    model.zero_grad()
    s = cfg.model.image_size
    images, tokens = torch.randn(2, 3, s, s), random_tokens(2)
    loss = model.loss(model(images, tokens), (torch.rand(2, 1, s, s) > 0.5).float())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            # a conv bias right before a training-mode BatchNorm is cancelled by its mean: its gradient is 0
            if not name.endswith("conv.bias"):
                assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_frozen_backbones_stay_in_eval_mode(tiny):
    _, model = tiny
    model.train()
    assert not model.vision.backbone.training and not model.text.transformer.training
    assert model.head.training and all(a.training for a in model.vision.adapters.values())


@pytest.mark.parametrize("size, out", [(448, 128), (224, 64), (126, 36)])
def test_output_is_a_quarter_of_a_patch(size: int, out: int):
    """Logits at 4x the 14-pixel patch grid: 128 x 128 for the 448 input."""
    cfg = preset("tiny-dcris")
    cfg.model.image_size = size
    model = build_model(cfg.model, pretrained=False).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size), random_tokens(1))
    assert logits.shape == (1, 1, out, out)


def test_bf16_autocast_forward_backward():
    cfg = preset("tiny-detris")
    model = build_model(cfg.model, pretrained=False).train()
    s = cfg.model.image_size
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, s, s), random_tokens(2))
        loss = model.loss(logits, torch.rand(2, 1, s, s))
    loss.backward()
    assert torch.isfinite(loss) and logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def shrunk(cfg: Config) -> Config:
    """The preset's layout (depths, adapter layers, taps, text form) at tiny widths and a 56 px input."""
    m = cfg.model
    m.image_size, m.vision.pretrained_size = 56, 70  # 4x4 patches from a stored 5x5 grid: interpolated
    m.vision.width, m.vision.heads = 32, 2
    m.text.width, m.text.heads, m.text.embed_dim, m.text.positions = 32, 2, 32, m.text.context_length
    a = m.adapters
    a.vision_hidden, a.text_hidden = max(16, a.vision_hidden // 8), max(16, a.text_hidden // 4)  # multiples of 16
    a.cross_width, a.cross_heads = 16, 2
    h = m.head
    h.width, h.decoder_layers, h.decoder_heads, h.ffn_dim, h.projector_dim = 32, 1, 2, 32, 16
    return cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_forward_and_backward_at_tiny_width(name: str):
    """Each preset's own layout (block counts, adapter placement, text form) trains one step at tiny width."""
    cfg = shrunk(preset(name))
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).train()
    assert len(model.vision.adapters) == len(cfg.model.adapters.vision_layers)
    assert len(model.text.adapters) == len(cfg.model.adapters.text_layers)
    images = torch.randn(2, 3, 56, 56)
    output = model(images, random_tokens(2, cfg.model.text.context_length))
    logits, no_target_logits = split_output(output)
    assert logits.shape == (2, 1, 16, 16)
    assert (no_target_logits is not None) == cfg.model.head.no_target
    model.loss(output, (torch.rand(2, 1, 56, 56) > 0.5).float(), torch.tensor([0, 2])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)


# ---------------------------------------------------------------------------------------------- weight loading


def test_vision_weights_round_trip_and_match_transformers_forward(tmp_path):
    """A tiny DINOv2 saved with save_pretrained loads through the real loader and reproduces HF's forward.

    At the size the position embedding was stored for nothing is resized, so every block must agree with
    transformers; at another size only the resize differs (see the next test), so the token embedding must equal
    transformers' patch embedding plus DINOv2's resized position embedding.
    """
    cfg = preset("tiny-dcris").model
    torch.manual_seed(1)
    reference = Dinov2WithRegistersModel(hf_vision_config(cfg.vision)).eval()
    with torch.no_grad():  # non-trivial LayerScale so every branch counts
        for layer in reference.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.5, 1.5)
            layer.layer_scale2.lambda1.uniform_(0.5, 1.5)
    reference.save_pretrained(tmp_path / "dino")
    cfg.vision.weights = str(tmp_path / "dino")
    cfg.adapters.vision_layers = []
    backbone = load_vision_backbone(cfg.vision, pretrained=True, allow_download=False)
    for (k, a), b in zip(reference.state_dict().items(), backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    encoder = VisionEncoder(cfg.vision, cfg.adapters, cfg.text.width, backbone).eval()
    size = cfg.vision.pretrained_size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = encoder(images, torch.randn(2, 17, cfg.text.width))
        out = reference(pixel_values=images, output_hidden_states=True)
    grid = size // cfg.vision.patch_size
    prefix = 1 + cfg.vision.num_registers

    def as_map(t):
        return t[:, prefix:].transpose(1, 2).reshape(2, -1, grid, grid)

    expected = [out.hidden_states[i + 1] for i in cfg.vision.taps] + [out.last_hidden_state]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, as_map(want), rtol=1e-5, atol=1e-5)

    small = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    side = cfg.image_size // cfg.vision.patch_size
    emb = reference.embeddings
    with torch.no_grad():
        tokens, _ = encoder.embed(small)
        patches = emb.patch_embeddings(small) + dinov2_position_embeddings(emb.position_embeddings, (side, side))[:, 1:]
    torch.testing.assert_close(tokens[:, prefix:], patches)
    torch.testing.assert_close(tokens[:, 0], (emb.cls_token[0] + emb.position_embeddings[:, 0]).expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:prefix], emb.register_tokens.expand(2, -1, -1))


def _keys_cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.75, PyTorch's and OpenCV's bicubic) at distances ``t``."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _dinov2_resize_by_hand(grid: np.ndarray, out: int, offset: float = 0.1) -> np.ndarray:
    """DINOv2's resize of an (M, M, C) grid written out: output pixel i samples the input at
    (i + 0.5) * M / (out + offset) - 0.5, four taps of Keys' cubic, indices clamped at the border."""
    m = grid.shape[0]
    weights = np.zeros((out, m))
    for i in range(out):
        src = (i + 0.5) * m / (out + offset) - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            weights[i, min(max(k, 0), m - 1)] += _keys_cubic(np.array(src - k))
    return np.einsum("ym,xn,mnc->yxc", weights, weights, grid)


def test_position_embedding_follows_dinov2_formula_on_a_smooth_field():
    """37x37 -> 32x32 (518 px -> 448 px): DINOv2's scale factor (32 + 0.1) / 37, no antialiasing (SPEC 2)."""
    m, n, dim = 37, 32, 6
    yy, xx = np.meshgrid(np.arange(m) / m, np.arange(m) / m, indexing="ij")
    rng = np.random.default_rng(0)
    freq, phase = rng.uniform(0.5, 3.0, (2, dim)), rng.uniform(0, 2 * np.pi, dim)
    field = np.sin(2 * np.pi * (yy[..., None] * freq[0] + xx[..., None] * freq[1]) + phase)  # (M, M, C), smooth
    cls_embedding = rng.normal(size=(1, dim))
    stored = torch.tensor(np.concatenate([cls_embedding, field.reshape(-1, dim)])[None], dtype=torch.float32)
    got = dinov2_position_embeddings(stored, (n, n))
    assert got.shape == (1, 1 + n * n, dim)
    torch.testing.assert_close(got[0, 0], stored[0, 0])  # the cls embedding is kept
    want = torch.tensor(_dinov2_resize_by_hand(field, n).reshape(-1, dim), dtype=torch.float32)
    torch.testing.assert_close(got[0, 1:], want, rtol=1e-5, atol=1e-5)
    # transformers' own resize (exactly n x n, antialiased) is measurably different on the same field
    hf = F.interpolate(stored[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), size=(n, n), mode="bicubic",
                       antialias=True).permute(0, 2, 3, 1).reshape(-1, dim)  # fmt: skip
    assert (hf - want).abs().max() > 0.01 * want.abs().max()
    assert dinov2_position_embeddings(stored, (m, m)) is stored  # the stored size is used as it is


def test_frozen_position_embedding_is_resized_once_and_follows_its_weights(monkeypatch: pytest.MonkeyPatch):
    from dcris import vision

    cfg = preset("tiny-dcris").model
    cfg.image_size = 56  # a 4x4 grid from the stored one: the resize runs
    encoder = build_model(cfg, pretrained=False).vision
    resize, resizes = dinov2_position_embeddings, []
    monkeypatch.setattr(vision, "dinov2_position_embeddings", lambda e, g: resizes.append(g) or resize(e, g))
    stored = encoder.backbone.embeddings.position_embeddings
    first = encoder.position_embedding((4, 4))
    torch.testing.assert_close(first, resize(stored, (4, 4)), rtol=0, atol=0)
    assert encoder.position_embedding((4, 4)) is first and len(resizes) == 1  # frozen: computed once
    encoder.position_embedding((5, 5))
    assert len(resizes) == 2  # another grid
    new = encoder.backbone.embeddings.state_dict()
    new["position_embeddings"] = torch.randn_like(stored)
    encoder.backbone.embeddings.load_state_dict(new)  # new weights in place: the cache must not serve the old
    torch.testing.assert_close(encoder.position_embedding((5, 5)), resize(new["position_embeddings"], (5, 5)))
    stored.requires_grad_(True)  # trained (full-tune): resized every call, and the gradient reaches it
    encoder.position_embedding((4, 4)).sum().backward()
    assert stored.grad is not None and stored.grad.abs().sum() > 0


def test_released_text_adapter_carries_twice_the_start_token():
    """Released form: position 0 goes into the up-projection as 2 * h[0]; later positions as branches + h."""
    torch.manual_seed(4)
    adapter = TextAdapter(64, 16, released=True).eval()
    with torch.no_grad():  # random BatchNorm statistics, so no branch is silently the identity
        for bn in (m for m in adapter.modules() if isinstance(m, torch.nn.BatchNorm1d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        out = adapter(x)
        h = torch.relu(adapter.down(x))  # (3, 17, 16)
        torch.testing.assert_close(out[:, 0], adapter.up(2 * h[:, 0]))
        rest = adapter.dense.reference_forward(h[:, 1:].transpose(1, 2)).transpose(1, 2)  # branches + h
        torch.testing.assert_close(out[:, 1:], adapter.up(rest))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_text_weights_round_trip_and_match_open_clip_forward(tmp_path, fmt: str):
    """A tiny open_clip CLIP saved as a checkpoint file loads through the real loader and reproduces encode_text."""
    cfg = preset("tiny-dcris").model
    t = cfg.text
    torch.manual_seed(2)
    clip = open_clip.model.CLIP(
        embed_dim=t.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers
        ),
        quick_gelu=True,
    ).eval()
    path = tmp_path / f"tiny_clip.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": clip.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(clip.state_dict(), str(path))
    t.weights = str(path)
    cfg.adapters.text_layers = []
    encoder = build_text_encoder(t, cfg.adapters, pretrained=True, allow_download=False).eval()
    tokens = random_tokens(3)
    with torch.no_grad():
        words, sentence = encoder(tokens)
        expected_sentence = clip.encode_text(tokens)
        x = clip.token_embedding(tokens) + clip.positional_embedding
        expected_words = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    torch.testing.assert_close(sentence, expected_sentence, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(words, expected_words, rtol=1e-5, atol=1e-5)


def test_missing_text_weights_are_a_clear_error(tmp_path):
    from dcris.errors import UserError

    cfg = preset("tiny-dcris").model
    cfg.text.weights = "openai"  # a real tag: refused without allow_download, nothing is fetched
    with pytest.raises(UserError, match="allow_download"):
        build_text_encoder(cfg.text, cfg.adapters, pretrained=True, allow_download=False)
    cfg.vision.weights = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="cannot load vision weights"):
        load_vision_backbone(cfg.vision, pretrained=True, allow_download=False)


def test_text_adapters_change_the_words_only_where_placed():
    cfg = preset("tiny-detris").model
    torch.manual_seed(3)
    with_ta = TextEncoder(cfg.text, cfg.adapters).eval()
    cfg.adapters.text_layers = []
    without = TextEncoder(cfg.text, cfg.adapters).eval()
    without.load_state_dict(with_ta.backbone_state_dict())
    tokens = random_tokens(2)
    with torch.no_grad():
        assert not torch.allclose(with_ta(tokens)[0], without(tokens)[0])
        for adapter in with_ta.adapters.values():
            torch.nn.init.zeros_(adapter.up.weight)
            torch.nn.init.zeros_(adapter.up.bias)
        torch.testing.assert_close(with_ta(tokens)[0], without(tokens)[0])


# ---------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "args, adapters, head",
    [
        (["--preset", "dcris-b"], 2_694_048, 22_802_433),
        (["--preset", "dcris-b", "--adapter-layers", "4,8,11"], 1_347_024, 22_802_433),
        (["--preset", "dcris-b", "--adapter-layers", "8"], 449_008, 22_802_433),
        (["--preset", "dcris-b", "--adapter-layers", ",".join(map(str, range(12)))], 5_388_096, 22_802_433),
        (["--preset", "detris-b"], 2_715_696, 22_802_433),
        (["--preset", "dcris-b", "--adapter-layers", "none"], 0, 22_802_433),
        (["--preset", "dcris-b-gres"], 2_694_048, 22_802_433 + (2 * 512 * 512 + 512) + (512 + 1)),  # 2 Linear
    ],
)
def test_params_command_reports_the_paper_counts(capsys, args: list[str], adapters: int, head: int):
    assert params_main([*args, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["adapter_params"] == adapters
    assert counts["head_params"] == head
    assert counts["no_target_params"] == head - 22_802_433  # the no-target output: what dcris-b-gres adds
    assert counts["frozen_params"] == 150_011_649  # DINOv2-B/14 reg 86,583,552 + CLIP text 63,428,097 (SPEC 3)
    assert counts["adapter_percent"] == pytest.approx(100 * adapters / counts["frozen_params"])


def test_params_of_the_released_mixed_data_layout(capsys):
    """DETRIS-L*: DA at 1..23 and TA at 1..11, both 384 wide; the cross-attention stays 128 wide (released code)."""
    assert params_main(["--preset", "detris-l-mixed", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["adapter_params"] == 33_331_360
    assert (counts["vision_adapter_params"], counts["text_adapter_params"]) == (27_638_640, 5_692_720)
    assert (counts["head_params"], counts["frozen_params"]) == (23_195_649, 367_800_833)


def test_params_table_da_only_and_ta_only(capsys):
    assert params_main(["--preset", "dcris-b", "--text-layers", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_params"] == 6 * 382_896
    assert params_main(["--preset", "dcris-b", "--vision-layers", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_params"] == 6 * 66_112
    assert params_main(["--preset", "dcris-b"]) == 0
    assert "2,694,048 (1.80% of backbone)" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_forward_never_syncs_with_the_host():
    """bf16 training step at the real input size with CUDA's sync debug mode set to raise on any sync."""
    cfg = preset("tiny-dcris")
    cfg.model.image_size = 448
    model = build_model(cfg.model, pretrained=False).cuda().train()
    images, tokens = torch.randn(2, 3, 448, 448, device="cuda"), random_tokens(2).cuda()
    masks = torch.rand(2, 1, 448, 448, device="cuda")
    model(images, tokens)  # warm-up: one-time set-up (kernel probes, caches) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(images, tokens)
            loss = model.loss(logits, masks)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (2, 1, 128, 128)


def test_python_dash_m_dcris_params():
    """The module entry point and the installed command are the same program."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "dcris", "params", "--preset", "detris-b", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    counts = json.loads(done.stdout)
    assert (counts["adapter_params"], counts["head_params"]) == (2_715_696, 22_802_433)


# ---------------------------------------------------------------------------------------------- no-target output


def _no_target_model(seed: int = 0) -> tuple[Config, torch.nn.Module]:
    torch.manual_seed(seed)
    cfg = preset("tiny-dcris")
    cfg.model.head.no_target, cfg.model.head.no_target_loss_weight = True, 0.7
    model = build_model(cfg.model, pretrained=False)
    for p in model.head.no_target.parameters():  # non-zero biases too
        torch.nn.init.normal_(p, std=0.2)
    return cfg, model.train()


def test_no_target_logit_and_loss_match_a_hand_computation():
    cfg, model = _no_target_model()
    captured = {}
    model.head.decoder.register_forward_hook(lambda _m, _i, out: captured.update(fq=out))
    images, tokens = torch.randn(4, 3, 112, 112), random_tokens(4)
    logits, no_target_logits = model(images, tokens)
    fq = captured["fq"].detach().numpy().reshape(4, cfg.model.head.width, -1)  # (B, C, hw)
    pooled = np.concatenate([fq.mean(axis=2), fq.max(axis=2)], axis=1)  # (B, 2C)
    head = {k: v.detach().numpy() for k, v in model.head.no_target.state_dict().items()}
    hidden = np.maximum(pooled @ head["fc1.weight"].T + head["fc1.bias"], 0)
    want = (hidden @ head["fc2.weight"].T + head["fc2.bias"])[:, 0]
    np.testing.assert_allclose(no_target_logits.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    masks = (torch.rand(4, 1, 112, 112) > 0.5).float()
    masks[0] = 0  # a phrase naming nothing has the empty mask
    num_targets = torch.tensor([0, 1, 3, 1])
    z, y = no_target_logits.detach().double().numpy(), np.array([1.0, 0, 0, 0])
    # ReLA's F.cross_entropy over two logits (0, z) with class weights (0.9, 1.1): sum(w_y * loss) / sum(w_y)
    two = np.stack([np.zeros_like(z), z], axis=1)
    log_softmax = two - np.log(np.exp(two).sum(axis=1, keepdims=True))
    w = np.where(y == 1, 1.1, 0.9)
    bce = np.sum(w * -log_softmax[np.arange(4), y.astype(int)]) / w.sum()
    rows = np.arange(32) * 112 // 32  # nearest resize 112 -> 32 (the logits' side): pixel floor(i * 112 / 32)
    x, t = logits.detach().double().numpy(), masks.double().numpy()[:, :, rows][:, :, :, rows]
    mask_bce = np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
    loss = model.loss((logits, no_target_logits), masks, num_targets)
    assert float(loss.detach()) == pytest.approx(mask_bce + 0.7 * bce, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.no_target.parameters())
    with pytest.raises(ValueError, match="num_targets"):
        model.loss((logits, no_target_logits), masks)


def test_an_export_made_before_the_no_target_output_loads_and_predicts_the_same(tmp_path):
    """An export whose config.json predates the no-target fields (and whose weights lack them) loads as before."""
    from dcris.export import CONFIG_FILE, load_exported, save_export

    torch.manual_seed(1)
    cfg = preset("tiny-dcris")
    model = build_model(cfg.model, pretrained=False).eval()
    folder = save_export(model.state_dict(), cfg, tmp_path / "old")
    payload = json.loads((folder / CONFIG_FILE).read_text())
    for key in ("no_target", "no_target_loss_weight", "no_target_class_weights", "no_target_threshold"):
        del payload["config"]["model"]["head"][key]  # the config as recorded before these fields existed
    (folder / CONFIG_FILE).write_text(json.dumps(payload))
    loaded = load_exported(folder)
    assert loaded.head.no_target is None and not any("no_target" in k for k in loaded.state_dict())
    assert loaded.cfg.head.no_target_threshold == 0.5  # an export made before calibration decides at 0.5
    images, tokens = torch.randn(2, 3, 112, 112), random_tokens(2)
    with torch.no_grad():
        assert torch.equal(loaded(images, tokens), model(images, tokens))
