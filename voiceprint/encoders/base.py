"""The one interface every speaker encoder implements (ECAPA-TDNN, CAM++, GE2E, ...).

Stages only talk to :class:`SpeakerEncoder`, so swapping the model never touches the extraction
engine, the index or the evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class SpeakerEncoder(ABC):
    """Maps a padded batch of 16 kHz mono waveforms to embeddings.

    ``embed(wavs, lengths)``: ``wavs`` is ``(B, T)`` float32, ``lengths`` is ``(B,)`` *relative*
    lengths in (0, 1] (SpeechBrain's convention); returns ``(B, D)`` float32, not normalised.
    Each encoder owns its feature front end.
    """

    name: str
    dim: int
    sample_rate: int = 16_000
    #: Whether the engine may run ``embed`` under bf16/fp16 autocast. Only encoders that keep their
    #: feature front end in float32 (log-mel of quiet frames suffers in 16 bits) and were checked
    #: against float32 say yes.
    autocast_safe: bool = False
    #: Set by an encoder whose network runs outside torch at a precision of its own (``openvino-bf16``):
    #: the embed stage records and fingerprints it instead of the engine's autocast type.
    fixed_precision: str | None = None

    @abstractmethod
    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def to(self, device: str | torch.device) -> SpeakerEncoder: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    def model_id(self) -> str:
        """Identifier stored with every embedding row (model name + weights fingerprint)."""
        return self.name

    def num_parameters(self) -> int:
        return 0


class ModuleEncoder(SpeakerEncoder):
    """Device and size plumbing shared by encoders that wrap ``torch.nn.Module`` s.

    Subclasses set ``self.model`` and ``self._device`` and list any extra modules (feature front
    ends with buffers) in :meth:`_modules`, so ``to()`` moves everything the forward pass touches.
    """

    model: torch.nn.Module
    _device: torch.device

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model]

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> ModuleEncoder:
        self._device = torch.device(device)
        for module in self._modules():
            module.to(self._device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
