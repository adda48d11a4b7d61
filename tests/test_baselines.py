"""Table 2's methods: exact parameter counts against hand formulas, placement against explicit composition,
gradients reach only the intended parameters, the loss falls, full fine-tuning under ZeRO-3; the Tables 3-5
switches against the per-layer formulas of the adapters."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dcris.config import ConfigError, load_config, preset
from dcris.export import exported_keys
from dcris.model import build_model, is_trainable_key
from dcris.params import main as params_main
from dcris.trainer import main as train_main

REPO = Path(__file__).resolve().parents[1]
BACKBONE_B = 86_583_552 + 63_428_097  # DINOv2-B/14 reg + CLIP ViT-B/16 text (SPEC 3)
UNUSED = 1 + 768  # CLIP's logit_scale and DINOv2's mask_token: never read by the forward pass


def _params(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert params_main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------- hand formulas
# Widths of DCRIS-B: vision D = 768 (12 blocks), text T = 512 (12 blocks).
D, T, BLOCKS = 768, 512, 12


def houlsby_count(m: int) -> int:
    """Two bottleneck adapters (down d*m + m, up m*d + d) per block of each encoder."""
    return 2 * BLOCKS * (2 * D * m + m + D) + 2 * BLOCKS * (2 * T * m + m + T)


def compacter_count(k: int, r: int, n: int) -> int:
    """Per adapter: PHM down (d*r + k*r factors + k bias) and up (k*r + d*r + d); one n^3 rule for all."""
    per = lambda d: 2 * r * (d + k) + k + d  # noqa: E731
    return 2 * BLOCKS * per(D) + 2 * BLOCKS * per(T) + n**3


def lora_count(r: int) -> int:
    """Vision: q, k, v each r*(768 + 768); text: one LoRA on the packed (3*512 x 512) in_proj: r*(512 + 1536)."""
    return BLOCKS * 3 * r * (D + D) + BLOCKS * r * (T + 3 * T)


def etris_count(d: int, stages: int) -> int:
    """Per ETRIS stage: two d-wide attentions (4d^2 + 4d each), Linear T->d and d->T, 1x1 convs D->d and d->D
    without bias, each followed by a BatchNorm (2d, 2D); LayerNorms (2d) for both streams from stage 2 on."""
    attention = 2 * (4 * d * d + 4 * d)
    per_stage = attention + (T * d + d) + (d * T + T) + (D * d + 2 * d) + (d * D + 2 * D)
    return stages * per_stage + (stages - 1) * 2 * 2 * d


def da_count(h: int, c: int = 128) -> int:
    """One DenseCrossAdapter of hidden h (SPEC 2): down, stepwise dense branch (conv + BN), cross-attention at width
    c (128 whatever h, as the released code), up."""
    q = h // 16
    dense = (h * h // 2 + h // 2 + h) + ((h + h // 2) * q + 3 * q) + (9 * q * h // 4 + 3 * h // 4)
    dense += ((h + h // 2 + h // 4) * q + 3 * q) + (25 * q * h // 4 + 3 * h // 4)
    cross = (h * c + c) + (T * c + c) + (3 * c * c + 3 * c + c * c + c) + (c * h + h)
    return (D * h + h) + dense + cross + (h * D + D)


def ta_count(h: int) -> int:
    """One TextAdapter, paper form: Linear(512 -> h) -> ReLU -> Linear(h -> 512)."""
    return (T * h + h) + (h * T + T)


# the paper's Table 2: (preset, exact count, the paper's count)
TABLE2 = [
    ("full-tune", BACKBONE_B - UNUSED, 149.97e6),
    ("fix-backbone", 0, 0.0),
    ("houlsby", houlsby_count(32), 1.98e6),
    ("compacter", compacter_count(192, 20, 4), 1.62e6),
    ("lora", lora_count(20), 1.57e6),
    ("etris", etris_count(128, 3), 1.38e6),
    ("dcris-b-3da", 1_347_024, 1.34e6),
    ("dcris-b", 2_694_048, 2.69e6),
]


def test_formulas_reproduce_the_spec_counts():
    """The per-layer formulas above give SPEC 3's exact DCRIS-B counts (so they can check other widths)."""
    assert da_count(128) == 382_896 and ta_count(64) == 66_112
    assert 3 * (da_count(128) + ta_count(64)) == 1_347_024 and 6 * (da_count(128) + ta_count(64)) == 2_694_048


@pytest.mark.parametrize("name, exact, paper", TABLE2, ids=[t[0] for t in TABLE2])
def test_table2_counts(capsys, name: str, exact: int, paper: float):
    counts = _params(capsys, "--preset", name)
    assert counts["added_params"] == exact
    assert counts["head_params"] == 22_802_433  # the same head in every row
    assert counts["backbone_params"] == BACKBONE_B
    assert abs(exact - paper) <= 0.03 * paper
    if name.startswith("dcris"):
        assert counts["baseline_params"] == 0 and counts["adapter_params"] == exact
    else:
        assert counts["adapter_params"] == 0 and counts["baseline_params"] == exact
    assert counts["frozen_params"] == (UNUSED if name == "full-tune" else BACKBONE_B)


def test_readme_table2_prints_what_dcris_params_counts(capsys):
    """Every row of the README's Table 2, the two DCRIS rows included, against ``dcris params`` for its preset."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("**Table 2**") : readme.index("**Tables 3-5**")]
    rows = re.findall(r"^\| `([\w-]+)` \| ([\d,]+) \|", table, flags=re.M)
    assert [name for name, _ in rows] == [name for name, _, _ in TABLE2]
    for name, printed in rows:
        assert int(printed.replace(",", "")) == _params(capsys, "--preset", name)["added_params"], name


# ------------------------------------------------------------------------------------ Tables 3-5 switches


def _layers_at(vision: str, text: str) -> list[str]:
    return [f"model.adapters.vision_layers={vision}", f"model.adapters.text_layers={text}"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.adapters.text_layers=[]"], 6 * da_count(128)),  # Table 3: DA only
        (["model.adapters.vision_layers=[]"], 6 * ta_count(64)),  # Table 3: TA only
        (["model.adapters.vision_layers=[]", "model.adapters.text_layers=[]"], 0),  # neither
        (["model.adapters.vision_hidden=64"], 6 * (da_count(64) + ta_count(64))),  # Table 4: DA width
        (["model.adapters.vision_hidden=256"], 6 * (da_count(256) + ta_count(64))),
        (["model.adapters.text_hidden=32"], 6 * (da_count(128) + ta_count(32))),  # Table 4: TA width
        (["model.adapters.text_hidden=100"], 6 * (da_count(128) + ta_count(100))),
        (_layers_at("8", "8"), da_count(128) + ta_count(64)),  # Table 5
        (_layers_at("0,5", "2,3,4"), 2 * da_count(128) + 3 * ta_count(64)),
    ],
)
def test_ablation_switches_against_the_formulas(capsys, overrides: list[str], expected: int):
    counts = _params(capsys, "--preset", "dcris-b", *overrides)
    assert counts["adapter_params"] == counts["added_params"] == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.adapters.vision_hidden=100", "multiple of 16"),
        ("model.adapters.vision_hidden=0", "multiple of 16"),
        ("model.adapters.text_hidden=0", "text_hidden must be positive"),
        ("model.baseline.method=adapterfusion", "model.baseline.method must be one of"),
    ],
)
def test_bad_switches_are_one_line(capsys, override: str, message: str):
    from dcris.cli import main as cli_main

    assert cli_main(["params", "--preset", "dcris-b", override]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and "Traceback" not in err


def test_method_settings_are_checked():
    with pytest.raises(ConfigError, match="phm_dim"):
        load_config(preset_name="compacter", overrides=["model.baseline.hidden=190"])
    with pytest.raises(ConfigError, match="vision_layers=\\[\\]"):
        load_config(preset_name="etris", overrides=["model.adapters.vision_layers=1"])
    with pytest.raises(ConfigError, match="must equal"):
        load_config(preset_name="etris", overrides=["model.text.layers=6"])
    with pytest.raises(ConfigError, match="leaves no block"):
        load_config(preset_name="houlsby", overrides=["model.baseline.every=13"])


# --------------------------------------------------------------------------------------- tiny-width modules

TINY_METHODS = {
    "houlsby": ["model.baseline.method=houlsby", "model.baseline.hidden=8"],
    "compacter": ["model.baseline.method=compacter", "model.baseline.hidden=8", "model.baseline.rank=2"],
    "lora": ["model.baseline.method=lora", "model.baseline.rank=4", "model.baseline.lora_alpha=8"],
    "etris": ["model.baseline.method=etris", "model.baseline.hidden=16", "model.baseline.heads=4",
              "model.baseline.every=2"],
}  # fmt: skip
NO_DCRIS = ["model.adapters.vision_layers=[]", "model.adapters.text_layers=[]"]


def tiny(method: str, *extra: str):
    return load_config(preset_name="tiny-dcris", overrides=[*NO_DCRIS, *TINY_METHODS[method], *extra])


def _batch(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.image_size
    tokens = torch.randint(1, 400, (2, 17), generator=g)
    tokens[:, 0], tokens[0, 6:], tokens[1, 11:] = 49406, 0, 0
    tokens[0, 5], tokens[1, 10] = 49407, 49407  # end tokens
    images = torch.randn(2, 3, s, s, generator=g)
    masks = (torch.rand(2, 1, s, s, generator=g) > 0.5).float()
    return images, tokens, masks


def _is_method_param(method: str, name: str) -> bool:
    return name.startswith("baseline.") if method != "lora" else ".lora_" in name


@pytest.mark.parametrize("method", sorted(TINY_METHODS))
def test_forward_backward_reaches_only_the_method_and_head(method: str):
    torch.manual_seed(0)
    cfg = tiny(method)
    model = build_model(cfg.model, pretrained=False).train()
    if method == "lora":  # B starts at zero, which makes A's first gradient zero: give B a value
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.1)
    images, tokens, masks = _batch(cfg)
    logits = model(images, tokens)
    assert logits.shape == (2, 1, 32, 32)
    model.loss(logits, masks).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    method_params = {n for n in trainable if _is_method_param(method, n)}
    assert method_params and trainable == method_params | {n for n in trainable if n.startswith("head.")}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and (p.grad.abs().sum() > 0 or name.endswith("conv.bias")), name
        else:
            assert p.grad is None, name
    # every method parameter is a key the export keeps
    assert all(is_trainable_key(n, cfg.model) for n in method_params)


@pytest.mark.parametrize("method", sorted(TINY_METHODS))
def test_loss_falls_on_a_repeated_batch_training_the_method_alone(method: str):
    """Only the method's parameters in the optimizer (the head stays at its init): the loss must still fall."""
    torch.manual_seed(0)
    cfg = tiny(method)
    model = build_model(cfg.model, pretrained=False).train()
    params = [p for n, p in model.named_parameters() if p.requires_grad and _is_method_param(method, n)]
    opt = torch.optim.Adam(params, lr=1e-2)
    images, tokens, masks = _batch(cfg, seed=1)
    losses = []
    for _ in range(8):
        loss = model.loss(model(images, tokens), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


class _Then(nn.Module):
    """``after(module(...))``: an adapter composed explicitly after a sublayer (the reference for the hooks)."""

    def __init__(self, module: nn.Module, after) -> None:
        super().__init__()
        self.module, self.after = module, after

    def forward(self, *args, **kwargs):
        return self.after(self.module(*args, **kwargs))


@pytest.mark.parametrize("method", ["houlsby", "compacter"])
def test_adapters_sit_after_attention_and_mlp(method: str):
    """The hooked model equals a hook-free copy in which each adapter is composed after o_proj / attn and mlp."""
    torch.manual_seed(0)
    cfg = tiny(method)
    model = build_model(cfg.model, pretrained=False).eval()
    with torch.no_grad():  # far from identity, so that every adapter matters
        for p in model.baseline.parameters():
            p.normal_(std=0.3)
    reference = build_model(tiny(method, "model.baseline.method=none").model, pretrained=False).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("baseline.")})
    plain = copy.deepcopy(reference)  # the same backbones and head without adapters
    adapters = model.baseline.adapters

    def apply(key):
        if method == "compacter":
            return lambda y: adapters[key](y, model.baseline.phm_rule)
        return adapters[key]

    for i, layer in enumerate(reference.vision.backbone.encoder.layer):
        layer.attention.o_proj = _Then(layer.attention.o_proj, apply(f"vision_{i}_attn"))
        layer.mlp = _Then(layer.mlp, apply(f"vision_{i}_mlp"))
    for i, block in enumerate(reference.text.transformer.resblocks):
        block.attn = _Then(block.attn, apply(f"text_{i}_attn"))
        block.mlp = _Then(block.mlp, apply(f"text_{i}_mlp"))
    images, tokens, _ = _batch(cfg)
    with torch.no_grad():
        expected, got, without = reference(images, tokens), model(images, tokens), plain(images, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, without, atol=1e-3)  # the adapters do change the output


def test_houlsby_starts_near_identity():
    torch.manual_seed(0)
    model = build_model(tiny("houlsby").model, pretrained=False).eval()
    reference = build_model(tiny("houlsby", "model.baseline.method=none").model, pretrained=False).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("baseline.")})
    images, tokens, _ = _batch(tiny("houlsby"))
    with torch.no_grad():
        a, b = model.text(tokens)[0], reference.text(tokens)[0]
    assert 0 < (a - b).abs().max() < 1e-3 * b.abs().max()
    for adapter in model.baseline.adapters.values():
        for layer in (adapter.down, adapter.up):
            assert layer.weight.abs().max() <= 2e-3 and not layer.bias.any()  # truncated at 2 std of 1e-3


def test_phm_weight_is_a_sum_of_kronecker_products():
    from dcris.bottleneck_adapters import PHMLinear

    torch.manual_seed(0)
    layer = PHMLinear(12, 8, n=4, rank=2)
    rule = torch.randn(4, 4, 4)
    expected = sum(torch.kron(rule[i], layer.left[i] @ layer.right[i]) for i in range(4))
    torch.testing.assert_close(layer.weight(rule), expected)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x, rule), x @ expected + layer.bias)


def test_compacter_shares_one_rule():
    model = build_model(tiny("compacter").model, pretrained=False)
    rules = [n for n, p in model.named_parameters() if p.shape == (4, 4, 4)]
    assert rules == ["baseline.phm_rule"]


def test_lora_is_w_plus_scaled_ba_on_the_projections():
    """peft's layers equal the pretrained weights plus (alpha / r) B A merged by hand: q/k/v in DINOv2, the packed
    in_proj_weight of the text attention."""
    torch.manual_seed(0)
    cfg = tiny("lora")
    model = build_model(cfg.model, pretrained=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.2)
    reference = build_model(tiny("lora", "model.baseline.method=none").model, pretrained=False).eval()
    state = model.state_dict()
    scale = cfg.model.baseline.lora_alpha / cfg.model.baseline.rank
    merged = {}
    for key in reference.state_dict():
        if key.startswith("text.transformer.resblocks.") and ".attn." in key:
            src = key.replace(".attn.", ".attn.base_layer.")
            merged[key] = state[src]
            if key.endswith("in_proj_weight"):
                prefix = key.rsplit(".", 1)[0]
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                merged[key] = merged[key] + scale * b @ a  # (3C, r) @ (r, C)
        elif any(f"attention.{p}." in key for p in ("q_proj", "k_proj", "v_proj")):
            module = key.rsplit(".", 1)[0]
            merged[key] = state[key.replace(module, f"{module}.base_layer")]
            if key.endswith("weight"):
                a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
                merged[key] = merged[key] + scale * b @ a
        else:
            merged[key] = state[key]
    reference.load_state_dict(merged)
    images, tokens, _ = _batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens), reference(images, tokens), rtol=1e-4, atol=1e-5)


def test_etris_bridges_the_text_stream_too():
    """The bridgers change the words (and the sentence), not only the image features."""
    torch.manual_seed(0)
    cfg = tiny("etris")
    model = build_model(cfg.model, pretrained=False).eval()
    images, tokens, _ = _batch(cfg)
    with torch.no_grad():
        maps, words, sentence = model.baseline(model.text, model.vision, images, tokens)
        plain_words, plain_sentence = model.text(tokens)
    assert len(maps) == 3 and maps[0].shape == (2, 64, 8, 8)
    assert not torch.allclose(words, plain_words) and not torch.allclose(sentence, plain_sentence)
    assert [len(model.baseline.stages), len(model.baseline.norm_vision)] == [2, 1]  # blocks 1 and 3
    last = model.baseline.stages[-1]
    assert isinstance(last.zoom_in[0], nn.ConvTranspose2d) and isinstance(last.zoom_out[0], nn.Conv2d)


# ----------------------------------------------------------------------------------------- full fine-tuning


def test_full_tune_trains_every_used_backbone_weight():
    torch.manual_seed(0)
    cfg = load_config(preset_name="tiny-dcris", overrides=[*NO_DCRIS, "model.train_backbones=true"])
    model = build_model(cfg.model, pretrained=False).train()
    assert model.vision.backbone.training and model.text.transformer.training  # no eval-mode rule now
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    model.requires_grad_(True)  # then: which parameters does the forward pass never reach?
    images, tokens, masks = _batch(cfg)
    model.loss(model(images, tokens), masks).backward()
    unreached = {n for n, p in model.named_parameters() if p.grad is None}
    assert frozen == unreached == {"text.logit_scale", "vision.backbone.embeddings.mask_token"}


def test_lora_with_full_fine_tuning_keeps_the_backbones_trainable(capsys):
    counts = _params(capsys, "--preset", "lora", "model.train_backbones=true")
    assert counts["added_params"] == BACKBONE_B - UNUSED + lora_count(20) and counts["frozen_params"] == UNUSED


def test_export_keys_follow_the_config():
    keys = list(build_model(preset("tiny-dcris").model, pretrained=False).state_dict())
    backbone = [k for k in keys if k.startswith(("text.transformer.", "vision.backbone."))]
    frozen_cfg, full_cfg = preset("dcris-b"), preset("full-tune")  # both name their backbone weights
    assert not set(backbone) & set(exported_keys(frozen_cfg, keys))
    assert set(backbone) <= set(exported_keys(full_cfg, keys))


def test_full_tune_under_zero3_in_one_process(shards: Path, tmp_path: Path):
    """ZeRO-3 partitions every weight; training changes the backbone, the export holds the trained weights."""
    out = tmp_path / "run"
    overrides = [*NO_DCRIS, "model.train_backbones=true"]
    argv = ["--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--preset", "tiny-dcris", f"data.shards={shards}",
            f"train.output_dir={out}", "data.loader=torch", "data.workers=1", "train.micro_batch=4",
            "train.global_batch=4", "train.max_steps=2", "train.precision=fp32", *overrides]  # fmt: skip
    assert train_main(argv) == 0
    cfg = load_config(preset_name="tiny-dcris", overrides=overrides)
    torch.manual_seed(cfg.train.seed)  # the trainer's init
    initial = build_model(cfg.model, pretrained=False).state_dict()
    exported = load_file(str(out / "export" / "model.safetensors"))
    # flattened: under ZeRO-3 the trainer hands CLIP's 0-d logit_scale to DeepSpeed as shape (1,)
    changed = {k for k in initial if k in exported and not torch.equal(initial[k].flatten(), exported[k].flatten())}
    backbone = {k for k in initial if k.startswith(("text.", "vision.backbone.")) and initial[k].is_floating_point()}
    assert backbone - changed == {"text.logit_scale", "vision.backbone.embeddings.mask_token"}
    from dcris.export import load_exported

    reloaded = load_exported(out / "export").state_dict()
    for k, v in exported.items():
        torch.testing.assert_close(reloaded[k].flatten(), v.flatten())
