"""Mixture of ECAPA-TDNN experts (``model.arch: moe``): a small CNN gate weighs K ECAPA-TDNNs.

:class:`EcapaMoE` is the network (gate, experts, :meth:`EcapaMoE.balance_loss`); its directory has a
format of its own, written by :func:`save_moe_checkpoint` and read by :func:`load_moe`;
:func:`gate_usage_stats` reports how the gate used the experts.
Design: docs/stages.md#mixture-of-ecapa-experts, docs/design/encoders.md#mixture-of-ecapa-experts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from speechbrain.dataio.dataio import length_to_mask

from voiceprint.common.atomic import atomic_dir
from voiceprint.common.checksums import sha256_file
from voiceprint.encoders.ecapa import (
    CLASSIFIER_CKPT,
    EMBEDDING_CKPT,
    LABEL_ENCODER,
    CheckpointError,
    EcapaConfig,
    FbankEncoder,
    check_state_dict,
    cpu_state_dict,
    load_state_dict,
    write_label_encoder,
    write_model_card,
)

MOE_CONFIG = "moe_config.json"
FORMAT = "voiceprint-moe"
CONFIG_VERSION = 1


@dataclass
class MoeConfig:
    """K ECAPA-TDNN experts of one shape plus a two-layer CNN gate of ``gate_channels``.

    Offers the same ``build`` / ``build_fbank`` / ``build_norm`` / ``lin_neurons`` as
    :class:`~voiceprint.encoders.ecapa.EcapaConfig`, so the training loops take either.
    """

    experts: int = 4
    expert: EcapaConfig = field(default_factory=lambda: EcapaConfig.from_channels(40))
    gate_channels: int = 64

    @classmethod
    def from_params(
        cls, experts: int, expert_channels: int, gate_channels: int, *, lin_neurons: int = 192, n_mels: int = 80
    ) -> MoeConfig:
        expert = EcapaConfig.from_channels(expert_channels, lin_neurons=lin_neurons, n_mels=n_mels)
        return cls(experts=experts, expert=expert, gate_channels=gate_channels)

    @property
    def lin_neurons(self) -> int:
        return self.expert.lin_neurons

    @property
    def n_mels(self) -> int:
        return self.expert.n_mels

    @property
    def channels(self) -> list[int]:
        return self.expert.channels

    @property
    def width(self) -> int:
        return self.expert.width

    def build(self) -> EcapaMoE:
        return EcapaMoE(self)

    def build_fbank(self) -> torch.nn.Module:
        return self.expert.build_fbank()

    def build_norm(self) -> torch.nn.Module:
        return self.expert.build_norm()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "experts": self.experts,
            "gate_channels": self.gate_channels,
            "expert": asdict(self.expert),
        }

    @classmethod
    def read(cls, path: Path) -> MoeConfig:
        """Parse ``moe_config.json``; any malformed field is a :class:`CheckpointError` naming the file."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("version") != CONFIG_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, expected {CONFIG_VERSION}")
            experts, gate = int(raw["experts"]), int(raw["gate_channels"])
            if experts < 1 or gate < 1:
                raise ValueError("experts and gate_channels must be positive")
            expert = EcapaConfig(**raw["expert"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(
                f"{path}: not a usable mixture-of-experts config ({type(err).__name__}: {err})"
            ) from None
        return cls(experts=experts, expert=expert, gate_channels=gate)


class GateNet(torch.nn.Module):
    """Two dilated 1-D convolutions over log-mel frames, masked mean+std pooling, a linear layer to K logits."""

    def __init__(self, n_mels: int, channels: int, experts: int):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(n_mels, channels, kernel_size=5, padding=2)
        self.bn1 = torch.nn.BatchNorm1d(channels)
        self.conv2 = torch.nn.Conv1d(channels, channels, kernel_size=3, dilation=2, padding=2)
        self.bn2 = torch.nn.BatchNorm1d(channels)
        self.out = torch.nn.Linear(2 * channels, experts)
        torch.nn.init.zeros_(self.out.weight)  # uniform weights at the start: no expert favoured by chance
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``feats`` (B, T, n_mels), relative ``lengths`` (B,) -> logits (B, K).

        Padding frames are zeroed before each convolution, which is exactly the zero padding an
        unpadded input gets at its end: a padded batch gates every item as it would alone.
        """
        x = feats.transpose(1, 2)
        frames = x.shape[-1]
        if lengths is None:
            mask = torch.ones(x.shape[0], frames, device=x.device)
        else:
            mask = length_to_mask(torch.round(lengths * frames), max_len=frames, device=x.device)
        mask = mask.unsqueeze(1).to(x.dtype)
        x = self.bn1(F.relu(self.conv1(x * mask))) * mask
        x = self.bn2(F.relu(self.conv2(x))) * mask
        count = mask.sum(-1).clamp(min=1.0)
        mean = (x * mask).sum(-1) / count
        std = (((x - mean.unsqueeze(-1)) ** 2 * mask).sum(-1) / count).clamp(min=1e-6).sqrt()
        return self.out(torch.cat([mean, std], dim=1))


class EcapaMoE(torch.nn.Module):
    """``forward(feats, lengths) -> (B, 1, D)``, the call signature of SpeechBrain's ``ECAPA_TDNN``.

    After every forward, :attr:`last_gates` holds the (detached) gate weights of that batch and
    :meth:`balance_loss` the load-balancing penalty on them.
    """

    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = torch.nn.ModuleList(cfg.expert.build() for _ in range(cfg.experts))
        self.gate = GateNet(cfg.n_mels, cfg.gate_channels, cfg.experts)
        self._gates: torch.Tensor | None = None  # of the last forward, in the autograd graph

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        gates = torch.softmax(self.gate(feats, lengths).float(), dim=-1)  # (B, K)
        embs = torch.stack(
            [F.normalize(expert(feats, lengths).squeeze(1).float(), dim=-1) for expert in self.experts], dim=1
        )  # (B, K, D)
        mixed = F.normalize((gates.unsqueeze(-1) * embs).sum(dim=1), dim=-1)
        self._gates = gates
        return mixed.unsqueeze(1)

    @property
    def last_gates(self) -> torch.Tensor | None:
        """``(B, K)`` gate weights of the last forward, detached (None before the first)."""
        return None if self._gates is None else self._gates.detach()

    def balance_loss(self) -> torch.Tensor:
        """``K * sum_k mean_b(g_bk)^2 - 1``: 0 when the batch uses every expert equally, K-1 when one takes all.

        It constrains the batch average only, so single inputs may still be routed sharply.
        """
        if self._gates is None:
            raise RuntimeError("balance_loss() before forward()")
        importance = self._gates.mean(dim=0)
        return self.cfg.experts * (importance**2).sum() - 1.0


def gate_usage_stats(weights: np.ndarray) -> dict[str, Any]:
    """How evenly and how sharply a mixture used its experts over ``weights`` (N, K) gate outputs.

    ``gate_importance``: mean weight of each expert. ``gate_load``: share of inputs on which each
    expert had the largest weight. ``gate_balance``: exp(entropy of the importance) / K, 1.0 when
    every expert carries the same share, 1/K when one carries all. ``gate_sharpness``:
    1 - mean per-input entropy / log K, 0 when every input mixes all experts equally, 1 when every
    input goes to a single expert.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] == 0:
        raise ValueError(f"expected (N, K) gate weights with N > 0, got shape {w.shape}")
    k = w.shape[1]
    importance = w.mean(axis=0)
    load = np.bincount(w.argmax(axis=1), minlength=k) / w.shape[0]
    p = np.clip(w, 1e-12, 1.0)
    per_input_entropy = -(p * np.log(p)).sum(axis=1)
    q = np.clip(importance, 1e-12, 1.0)
    importance_entropy = float(-(q * np.log(q)).sum())
    return {
        "gate_experts": k,
        "gate_inputs": int(w.shape[0]),
        "gate_importance": [round(float(v), 4) for v in importance],
        "gate_load": [round(float(v), 4) for v in load],
        "gate_balance": float(math.exp(importance_entropy) / k),
        "gate_sharpness": float(1.0 - per_input_entropy.mean() / math.log(k)) if k > 1 else 1.0,
    }


class MoeEncoder(FbankEncoder):
    """The mixture behind the :class:`~voiceprint.encoders.base.SpeakerEncoder` interface.

    Every ``embed`` call appends its gate weights to a log, so whoever embedded a data set can ask
    :meth:`gate_usage` how the experts were used on it (the comparison stage reports it).
    """

    name = "ecapa-moe"

    def __init__(self, model: EcapaMoE, cfg: MoeConfig, *, weights_sha256: str):
        super().__init__(model, cfg, weights_sha256=weights_sha256)
        self._gate_log: list[np.ndarray] = []

    @property
    def model_id(self) -> str:
        return moe_model_id(self.cfg, self.weights_sha256)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        emb = super().embed(wavs, lengths)
        self._gate_log.append(self.model.last_gates.float().cpu().numpy())
        return emb

    def gate_usage(self) -> dict[str, Any]:
        """:func:`gate_usage_stats` over every input embedded so far (empty dict before any)."""
        return gate_usage_stats(np.concatenate(self._gate_log)) if self._gate_log else {}

    def reset_gate_usage(self) -> None:
        self._gate_log.clear()


def moe_model_id(cfg: MoeConfig, weights_sha256: str) -> str:
    return f"ecapa-moe{cfg.experts}x{cfg.width}-{weights_sha256[:12]}"


def is_moe_dir(path: str | Path) -> bool:
    return (Path(path) / MOE_CONFIG).is_file()


def save_moe_checkpoint(
    model_dir: str | Path,
    model: EcapaMoE,
    cfg: MoeConfig,
    *,
    classifier: torch.nn.Module,
    labels: list[str],
    extra_card: dict[str, Any] | None = None,
) -> Path:
    """Write the mixture, its AAM classifier and labels to ``model_dir`` (built aside, swapped in whole)."""
    model_dir = Path(model_dir).resolve()
    with atomic_dir(model_dir) as tmp:
        torch.save(cpu_state_dict(model), tmp / EMBEDDING_CKPT)
        torch.save(cpu_state_dict(classifier), tmp / CLASSIFIER_CKPT)
        write_label_encoder(tmp / LABEL_ENCODER, labels)
        (tmp / MOE_CONFIG).write_text(json.dumps(cfg.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        sha = sha256_file(tmp / EMBEDDING_CKPT)
        write_model_card(
            tmp,
            format=FORMAT,
            architecture="EcapaMoE",
            model_id=moe_model_id(cfg, sha),
            sha=sha,
            embedding_dim=cfg.lin_neurons,
            num_parameters=sum(p.numel() for p in model.parameters()),
            num_classes=len(labels),
            config=cfg.to_json(),
            extra=extra_card,
        )
    return model_dir


def load_moe(model_dir: str | Path, *, device: str | torch.device = "cpu") -> MoeEncoder:
    """Load a mixture directory; the state dict must match ``moe_config.json`` exactly."""
    model_dir = Path(model_dir)
    cfg = MoeConfig.read(model_dir / MOE_CONFIG)
    model = cfg.build()
    path = model_dir / EMBEDDING_CKPT
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a mixture-of-experts directory needs its weights)")
    state = load_state_dict(path)
    check_state_dict(
        state, model, path, f"EcapaMoE({cfg.experts} experts of channels={cfg.channels}) from {MOE_CONFIG}"
    )
    model.load_state_dict(state, strict=True)
    return MoeEncoder(model, cfg, weights_sha256=sha256_file(path)).to(device)
