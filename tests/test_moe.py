"""Mixture of ECAPA-TDNN experts: gate, balance loss, usage statistics, training and its model directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import N_SPEAKERS, _segments_table

from voiceprint.common import audio
from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.compare.stage import render_gate_usage, render_markdown
from voiceprint.config import ConfigError, ModelParams, Params, load_params
from voiceprint.encoders.ecapa import CheckpointError, EcapaConfig
from voiceprint.encoders.loader import load_encoder
from voiceprint.encoders.moe import (
    MOE_CONFIG,
    MoeConfig,
    MoeEncoder,
    gate_usage_stats,
    load_moe,
)
from voiceprint.training.stage import build_model


def _tiny(experts: int = 3) -> MoeConfig:
    return MoeConfig(experts=experts, expert=EcapaConfig.from_channels(16, lin_neurons=24), gate_channels=8)


def test_gate_starts_uniform_and_the_mixture_is_unit_length() -> None:
    torch.manual_seed(0)
    model = _tiny(3).build().eval()
    with torch.no_grad():
        out = model(torch.randn(4, 120, 80), torch.ones(4))
    assert out.shape == (4, 1, 24)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4, 1), atol=1e-5)
    assert torch.allclose(model.last_gates, torch.full((4, 3), 1 / 3))


def test_mixture_is_the_gate_weighted_sum_of_normalised_experts() -> None:
    torch.manual_seed(1)
    model = _tiny(2).build().eval()
    torch.nn.init.normal_(model.gate.out.weight, std=0.5)  # a gate with opinions
    feats, lengths = torch.randn(3, 100, 80), torch.ones(3)
    with torch.no_grad():
        out = model(feats, lengths).squeeze(1)
        gates = model.last_gates
        experts = [torch.nn.functional.normalize(e(feats, lengths).squeeze(1), dim=-1) for e in model.experts]
    expected = torch.nn.functional.normalize(gates[:, :1] * experts[0] + gates[:, 1:] * experts[1], dim=-1)
    assert not torch.allclose(gates, torch.full_like(gates, 0.5))
    assert torch.allclose(out, expected, atol=1e-5)


def test_gate_ignores_padding() -> None:
    torch.manual_seed(2)
    model = _tiny(3).build().eval()
    torch.nn.init.normal_(model.gate.out.weight, std=0.5)
    x = torch.randn(1, 80, 80)
    padded = torch.cat([x, 100 * torch.randn(1, 40, 80)], dim=1)
    with torch.no_grad():
        alone = model.gate(x, torch.ones(1))
        with_padding = model.gate(padded, torch.tensor([80 / 120]))
    assert torch.allclose(alone, with_padding, atol=1e-4)


def test_balance_loss_is_zero_when_even_and_k_minus_1_when_collapsed() -> None:
    model = _tiny(4).build()
    model._gates = torch.full((8, 4), 0.25)
    assert model.balance_loss().item() == pytest.approx(0.0, abs=1e-6)
    model._gates = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 4).float()
    assert model.balance_loss().item() == pytest.approx(3.0)
    model._gates = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()  # sharp, but evenly spread
    assert model.balance_loss().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(RuntimeError, match="before forward"):
        _tiny(2).build().balance_loss()


def test_gate_usage_stats_on_known_patterns() -> None:
    uniform = gate_usage_stats(np.full((10, 4), 0.25))
    assert uniform["gate_balance"] == pytest.approx(1.0) and uniform["gate_sharpness"] == pytest.approx(0.0, abs=1e-9)
    assert uniform["gate_importance"] == [0.25] * 4 and uniform["gate_inputs"] == 10

    collapsed = gate_usage_stats(np.eye(4)[[0] * 10])
    assert collapsed["gate_balance"] == pytest.approx(0.25, abs=1e-6)
    assert collapsed["gate_sharpness"] == pytest.approx(1.0, abs=1e-6)
    assert collapsed["gate_load"] == [1.0, 0.0, 0.0, 0.0]

    routed = gate_usage_stats(np.eye(4)[[0, 1, 2, 3] * 5])  # every input to one expert, all experts used
    assert routed["gate_balance"] == pytest.approx(1.0) and routed["gate_sharpness"] == pytest.approx(1.0, abs=1e-6)
    assert routed["gate_load"] == [0.25] * 4
    with pytest.raises(ValueError, match="gate weights"):
        gate_usage_stats(np.zeros((0, 4)))


def test_default_mixture_has_the_parameter_count_of_the_default_ecapa() -> None:
    params = ModelParams(arch="moe")
    mixture = MoeConfig.from_params(params.moe.experts, params.moe.expert_channels, params.moe.gate_channels).build()
    single = EcapaConfig.from_channels(ModelParams().channels).build()
    n_moe = sum(p.numel() for p in mixture.parameters())
    n_single = sum(p.numel() for p in single.parameters())
    assert abs(n_moe / n_single - 1) < 0.02, (n_moe, n_single)


def test_moe_with_a_pretrained_source_is_a_config_error(params_writer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.arch 'moe' needs model.init"):
        load_params(params_writer(tmp_path), overrides={"model.arch": "moe", "model.init": "pretrained"})


@pytest.fixture(scope="module")
def trained_moe(tmp_path_factory: pytest.TempPathFactory, excerpts_dir: Path) -> tuple[Layout, dict]:
    layout = Layout.at(tmp_path_factory.mktemp("moe-project"))
    write_table(layout.segments, _segments_table(excerpts_dir))
    params = ModelParams(
        arch="moe",
        moe={"experts": 2, "expert_channels": 16, "gate_channels": 8, "balance": 0.1},
        steps=20,
        batch_size=12,
        crop_s=1.0,
        seed=0,
        device="cpu",
        augment={"kinds": ["noise"]},
        register_model=False,
        aam={"margin_ramp": (0.0, 0.0)},  # one objective throughout, so that the loss's fall is measured
    )
    return layout, build_model(params, layout, progress=False)


def test_moe_training_lowers_the_loss_and_writes_its_own_format(trained_moe: tuple[Layout, dict]) -> None:
    layout, stats = trained_moe
    assert stats["arch"] == "moe" and stats["experts"] == 2 and stats["num_speakers"] == N_SPEAKERS
    assert stats["loss_final"] < stats["loss_initial"] - 1.0, stats
    assert 0.0 <= stats["gate_balance_loss_final"] <= 1.0
    assert stats["model_id"].startswith("ecapa-moe2x16-")
    files = {p.name for p in layout.model_dir.iterdir()}
    assert {MOE_CONFIG, "embedding_model.ckpt", "classifier.ckpt", "label_encoder.txt", "model_card.json"} <= files
    assert "hyperparams.yaml" not in files  # SpeechBrain could not build this network from one
    card = json.loads((layout.model_dir / "model_card.json").read_text())
    assert card["format"] == "voiceprint-moe" and card["model_id"] == stats["model_id"]
    assert card["num_parameters"] == stats["num_parameters"]


def test_trained_moe_loads_through_the_registry_and_logs_its_gates(
    trained_moe: tuple[Layout, dict], test_other_files: list[Path]
) -> None:
    layout, stats = trained_moe
    encoder = load_encoder("ecapa", model_dir=layout.model_dir)
    assert isinstance(encoder, MoeEncoder) and encoder.model_id == stats["model_id"] and encoder.dim == 192
    assert load_encoder(f"model:{layout.model_dir}").model_id == stats["model_id"]
    wavs = [torch.from_numpy(audio.load(f, 0.0, 2.0)) for f in test_other_files[:3]]
    batch = torch.stack(wavs)
    first = encoder.embed(batch, torch.ones(3))
    again = load_moe(layout.model_dir).embed(batch, torch.ones(3))
    assert first.shape == (3, 192) and torch.allclose(first, again)
    assert torch.allclose(first.norm(dim=1), torch.ones(3), atol=1e-5)
    usage = encoder.gate_usage()
    assert usage["gate_inputs"] == 3 and usage["gate_experts"] == 2
    assert math.isclose(sum(usage["gate_importance"]), 1.0, abs_tol=1e-3)
    encoder.reset_gate_usage()
    assert encoder.gate_usage() == {}


def test_moe_directory_that_does_not_match_its_config_is_refused(
    trained_moe: tuple[Layout, dict], tmp_path: Path
) -> None:
    layout, _ = trained_moe
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in layout.model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / MOE_CONFIG).read_text())
    config["experts"] = 3
    (broken / MOE_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"embedding_model.ckpt: state_dict does not match EcapaMoE\(3 experts"):
        load_moe(broken)
    (broken / MOE_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="moe_config.json: not a usable mixture-of-experts config"):
        load_encoder("ecapa", model_dir=broken)


def test_compare_table_reports_gate_usage_only_for_mixtures() -> None:
    single = {"eer": 0.05, "top1": 0.9}
    gates = gate_usage_stats(np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]))  # an encoder's own keys
    assert render_gate_usage({"ecapa": single}) == ""
    table = render_markdown(
        {"librispeech": {"ecapa": single, "moe": {"eer": 0.04, "top1": 0.95}}}, {"ecapa": {}, "moe": gates}
    )
    assert "## librispeech" in table and table.count("## Mixture-of-experts gate usage") == 1
    assert "## Mixture-of-experts gate usage" in table
    row = next(line for line in table.splitlines() if line.startswith("| moe | 2 |"))
    assert "0.50 / 0.50" in row and "67 % / 33 %" in row


def test_params_default_arch_is_the_single_ecapa() -> None:
    assert Params().model.arch == "ecapa"
