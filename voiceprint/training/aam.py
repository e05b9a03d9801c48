"""Additive angular margin (AAM-softmax / ArcFace) speaker-classification head, from SpeechBrain.

:class:`AAMHead` and :func:`aam_softmax_loss` reuse SpeechBrain's ``Classifier``,
``AdditiveAngularMargin`` and ``LogSoftmaxWrapper``, so ``classifier.ckpt`` loads into
``ECAPA_TDNN.Classifier``. Design: docs/design/training.md#the-aam-softmax-head.
"""

from __future__ import annotations

import torch
from speechbrain.lobes.models.ECAPA_TDNN import Classifier
from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper


def aam_softmax_loss(margin: float, scale: float) -> LogSoftmaxWrapper:
    """SpeechBrain's AAM-softmax: ``loss(cosines (B, 1, C), targets (B, 1)) -> scalar``."""
    return LogSoftmaxWrapper(AdditiveAngularMargin(margin=margin, scale=scale))


class AAMHead(torch.nn.Module):
    """Cosine classifier + AAM-softmax loss, returning the loss and the (margin-free) cosines.

    The cosines without margin are what accuracy should be measured on: with the margin applied,
    "accuracy" would understate how separable the embeddings already are.
    """

    def __init__(self, embedding_dim: int, n_classes: int, *, margin: float, scale: float):
        super().__init__()
        self.classifier = Classifier(input_size=embedding_dim, out_neurons=n_classes)
        self.scale = scale
        self.loss_fn = aam_softmax_loss(margin, scale)

    @property
    def margin(self) -> float:
        return float(self.loss_fn.loss_fn.margin)

    def set_margin(self, margin: float) -> None:
        """Change the angular margin during training (a margin schedule).

        SpeechBrain derives cos m, sin m and the threshold terms from the margin once, at
        construction, so the loss is rebuilt rather than its ``margin`` attribute patched. The loss
        holds no parameters or buffers: the head's ``state_dict`` is unchanged by this.
        """
        if margin != self.margin:
            self.loss_fn = aam_softmax_loss(margin, self.scale)

    def fix_centres(self, centres: torch.Tensor) -> None:
        """Set the class weights (centres) to ``centres`` ``(n_classes, D)`` and stop training them
        (``model.aam.centres: teacher``). Only their direction matters: the classifier normalises them."""
        weight = self.classifier.weight
        if tuple(centres.shape) != tuple(weight.shape):
            raise ValueError(f"centres of shape {tuple(centres.shape)} for a head of shape {tuple(weight.shape)}")
        with torch.no_grad():
            weight.copy_(centres.to(weight.device, weight.dtype))
        weight.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embeddings`` (B, 1, D) or (B, D); ``targets`` (B,) int -> (loss, cosines (B, C))."""
        if embeddings.dim() == 2:
            embeddings = embeddings.unsqueeze(1)
        # Cosines and the margin in float32: under bf16 autocast cos(θ+m) near ±1 is too coarse.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosines = self.classifier(embeddings.float())
            loss = self.loss_fn(cosines, targets.view(-1, 1))
        return loss, cosines.squeeze(1)

    def first_classes(self, n: int) -> Classifier:
        """The classifier cut to its first ``n`` rows, e.g. the real speakers when training added
        pseudo-speaker classes that mean nothing outside training."""
        weight = self.classifier.weight
        if n == weight.shape[0]:
            return self.classifier
        if not 0 < n < weight.shape[0]:
            raise ValueError(f"cannot keep {n} of {weight.shape[0]} classes")
        cut = Classifier(input_size=weight.shape[1], out_neurons=n)
        with torch.no_grad():
            cut.weight.copy_(weight[:n])
        return cut
