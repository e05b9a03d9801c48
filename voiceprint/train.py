"""Model stage: train ECAPA-TDNN from scratch on the train split, or adopt a pretrained SpeechBrain model.

Either way the result is a SpeechBrain-layout directory at ``layout.model_dir`` (see
:mod:`voiceprint.encoders.ecapa`), written atomically, which the embedding stage loads with
:func:`~voiceprint.encoders.ecapa.load_ecapa`.

Training is sized for a small CPU: the default train set (251 LibriSpeech speakers, one 10-15 s
utterance each, ~50 min of audio) is decoded once into memory, and every step draws one random
``crop_s`` crop per speaker for a speaker-balanced batch. With a single utterance per speaker the
model can only learn speaker identity from different crops of the same recording, so augmentation
(additive white/pink/brown noise at a random SNR, random gain) is what stops it from keying on
recording conditions. The loss is SpeechBrain's AAM-softmax, the optimiser Adam with a linear
warm-up and cosine decay.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from voiceprint import audio
from voiceprint.config import ModelParams
from voiceprint.encoders.aam import AAMHead
from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa, save_speechbrain_checkpoint
from voiceprint.layout import Layout
from voiceprint.schema import SEGMENTS

log = logging.getLogger(__name__)

# Decoded training audio is held in memory as float32 (230 MB per hour); beyond this budget a
# seeded per-speaker subset of segments is used so a large train split cannot exhaust RAM.
MAX_TRAIN_AUDIO_HOURS = 4.0
# Fraction of steps spent in linear warm-up, and the floor of the cosine decay (fraction of lr).
WARMUP_FRACTION = 0.1
MIN_LR_FRACTION = 0.01
# Gradient-norm clip: AAM with scale 30 gives large early gradients on a randomly initialised net.
GRAD_CLIP = 5.0


class TrainingError(RuntimeError):
    """Training cannot start (no train split, too few speakers, unusable audio)."""


@dataclass
class TrainingData:
    """Decoded training audio: ``clips[i]`` are the 16 kHz segments of speaker ``labels[i]``.

    ``segment_ids[i][j]`` / ``segment_starts[i][j]`` name ``clips[i][j]`` and its start time in its
    file (filled by :func:`load_training_data`; empty for hand-built data), so that distillation
    can key cached teacher embeddings by segment.
    """

    labels: list[str]
    clips: list[list[np.ndarray]]
    skipped: list[str] = field(default_factory=list)
    segment_ids: list[list[str]] = field(default_factory=list)
    segment_starts: list[list[float]] = field(default_factory=list)

    @property
    def num_segments(self) -> int:
        return sum(len(c) for c in self.clips)

    @property
    def audio_seconds(self) -> float:
        return sum(len(x) for c in self.clips for x in c) / audio.TARGET_SR


# --------------------------------------------------------------------------------------------------
# Public entry points


def build_model(params: ModelParams, layout: Layout, *, progress: bool = True) -> dict[str, Any]:
    """Produce ``layout.model_dir`` according to ``params.init`` and return stats for metrics/logs."""
    if params.init == "scratch":
        return train_scratch(params, layout, progress=progress)
    if params.init == "distill":
        from voiceprint.distill import train_distill  # imported lazily: it pulls in the CAM++ teacher

        return train_distill(params, layout, progress=progress)
    t0 = time.perf_counter()
    encoder = load_ecapa(params.source, device="cpu")
    encoder.export(layout.model_dir, extra_card={"init": "pretrained", "source": params.source})
    log.info("adopted pretrained %s from %s into %s", encoder.model_id, params.source, layout.model_dir)
    return {
        "init": "pretrained",
        "source": params.source,
        "model_id": encoder.model_id,
        "num_parameters": encoder.num_parameters(),
        "embedding_dim": encoder.dim,
        "channels": encoder.cfg.channels,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def train_scratch(params: ModelParams, layout: Layout, *, progress: bool = True) -> dict[str, Any]:
    """Train ECAPA-TDNN (``channels=[C,C,C,C,3C]``) on the train split of ``layout.segments``.

    Returns ``steps``, ``loss_initial``/``loss_final`` (mean over the first/last ``loss_window``
    steps), ``train_accuracy`` (margin-free, last window), timings, sizes and ``model_id``.
    """
    t0 = time.perf_counter()
    _seed_everything(params.seed)
    device = resolve_device(params.device)
    data = load_training_data(layout, seed=params.seed, progress=progress)
    decode_s = time.perf_counter() - t0

    cfg = EcapaConfig.from_channels(params.channels, lin_neurons=params.lin_neurons, n_mels=params.n_mels)
    model, head, history = fit(data, params, cfg, device=device, progress=progress)
    train_s = time.perf_counter() - t0 - decode_s

    stats = summarise_training("scratch", params, cfg, model, data, history)
    card_stats = dict(stats)
    stats.update(
        device=str(device),
        decode_seconds=round(decode_s, 2),
        seconds_per_step=round(train_s / params.steps, 4) if params.steps else None,
    )
    stats["model_id"] = save_trained_model(layout, params, cfg, model, head, data, card_stats)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    log.info(
        "trained %s: %d steps, loss %.3f -> %.3f, train acc %.3f, %.1f s",
        stats["model_id"], params.steps, stats["loss_initial"] or 0.0, stats["loss_final"] or 0.0,
        stats["train_accuracy"] or 0.0, stats["seconds"],
    )
    return stats


def summarise_training(
    init: str, params: ModelParams, cfg: EcapaConfig, model: torch.nn.Module, data: "TrainingData",
    history: dict[str, list[float]],
) -> dict[str, Any]:
    """Loss/accuracy (and distillation cosine) averaged over the first and last steps, plus data sizes."""
    window = min(20, max(1, len(history["loss"]) // 4))
    stats: dict[str, Any] = {
        "init": init,
        "steps": params.steps,
        "loss_window": window,
        "loss_initial": _mean(history["loss"][:window]),
        "loss_final": _mean(history["loss"][-window:]),
        "train_accuracy": _mean(history["acc"][-window:]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_speakers": len(data.labels),
        "num_segments": data.num_segments,
        "skipped_segments": len(data.skipped),
        "audio_seconds": round(data.audio_seconds, 1),
        "channels": cfg.channels,
    }
    if "cosine" in history:
        stats["cosine_initial"] = _mean(history["cosine"][:window])
        stats["cosine_final"] = _mean(history["cosine"][-window:])
    return stats


def save_trained_model(
    layout: Layout, params: ModelParams, cfg: EcapaConfig, model: torch.nn.Module, head: Any,
    data: "TrainingData", card_stats: dict[str, Any],
) -> str:
    """Write the trained encoder (+ AAM classifier and labels) in SpeechBrain's layout; its model id."""
    model_dir = save_speechbrain_checkpoint(
        layout.model_dir,
        model.cpu().eval(),
        cfg,
        classifier=head.classifier.cpu().eval(),
        labels=data.labels,
        extra_card={"training": card_stats, "params": params.model_dump()},
    )
    return load_ecapa(model_dir).model_id  # loading it back proves the written directory is usable


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(choice)


# --------------------------------------------------------------------------------------------------
# Data


def load_training_data(
    layout: Layout,
    *,
    seed: int = 0,
    progress: bool = True,
    max_hours: float = MAX_TRAIN_AUDIO_HOURS,
) -> TrainingData:
    """Decode every train-split segment of ``layout.segments`` once, grouped by speaker."""
    path = layout.segments
    if not path.exists():
        raise TrainingError(f"{path}: not found; init=scratch trains on the segments table (run the VAD stage)")
    table = pq.read_table(path)
    missing = [c for c in SEGMENTS.names if c not in table.column_names]
    if missing:
        raise TrainingError(f"{path}: missing columns {missing}")
    rows = [r for r in table.select(SEGMENTS.names).to_pylist() if r["split"] == "train"]
    if not rows:
        splits = sorted({str(s) for s in table.column("split").to_pylist()})
        raise TrainingError(
            f"{path}: no rows with split='train' (found splits: {splits or 'none'}); a train split is "
            "required for model.init=scratch or distill (or use model.init=pretrained)"
        )
    rows = _cap_hours(rows, max_hours, seed)

    by_speaker: dict[str, list[np.ndarray]] = {}
    ids: dict[str, list[str]] = {}
    starts: dict[str, list[float]] = {}
    skipped: list[str] = []
    for row in tqdm(rows, desc="decode train", unit="seg", disable=not progress, leave=False):
        file = Path(row["path"])
        file = file if file.is_absolute() else layout.root / file
        try:
            wav = audio.load(file, row["start_s"], row["end_s"])
        except audio.AudioError as err:
            log.warning("skipping training segment %s: %s", row["segment_id"], err)
            skipped.append(row["segment_id"])
            continue
        if len(wav) >= audio.TARGET_SR // 10:  # under 0.1 s there is nothing to crop
            speaker = str(row["speaker_id"])
            by_speaker.setdefault(speaker, []).append(wav)
            ids.setdefault(speaker, []).append(str(row["segment_id"]))
            starts.setdefault(speaker, []).append(float(row["start_s"]))
    labels = sorted(by_speaker)
    if len(labels) < 2:
        raise TrainingError(f"{path}: need at least 2 training speakers with usable audio, found {len(labels)}")
    return TrainingData(
        labels=labels,
        clips=[by_speaker[s] for s in labels],
        skipped=skipped,
        segment_ids=[ids[s] for s in labels],
        segment_starts=[starts[s] for s in labels],
    )


def _cap_hours(rows: list[dict[str, Any]], max_hours: float, seed: int) -> list[dict[str, Any]]:
    total = sum(r["end_s"] - r["start_s"] for r in rows)
    if total <= max_hours * 3600:
        return rows
    rng = random.Random(seed)
    per_speaker: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        per_speaker.setdefault(str(r["speaker_id"]), []).append(r)
    budget = max_hours * 3600 / len(per_speaker)
    kept: list[dict[str, Any]] = []
    for segs in per_speaker.values():
        rng.shuffle(segs)
        used = 0.0
        for r in segs:
            if used >= budget:
                break
            kept.append(r)
            used += r["end_s"] - r["start_s"]
    log.warning(
        "train split has %.1f h of audio; using a per-speaker subset of %.1f h (MAX_TRAIN_AUDIO_HOURS)",
        total / 3600, sum(r["end_s"] - r["start_s"] for r in kept) / 3600,
    )
    return kept


class CropSampler:
    """Speaker-balanced random crops: every speaker appears once per pass, in shuffled order.

    Within a speaker a segment is picked with probability proportional to its length (so every
    second of audio is equally likely), then a uniformly random ``crop`` samples; shorter segments
    are tiled cyclically rather than zero-padded so the batch needs no length masks.
    """

    def __init__(self, data: TrainingData, crop_samples: int, rng: np.random.Generator):
        self.data = data
        self.crop = crop_samples
        self.rng = rng
        self._weights = []
        for clips in data.clips:
            lengths = np.array([len(c) for c in clips], dtype=np.float64)
            self._weights.append(lengths / lengths.sum())
        self._queue: list[int] = []

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._queue) < batch_size:
            self._queue.extend(self.rng.permutation(len(self.data.labels)).tolist())
        speakers, self._queue = self._queue[:batch_size], self._queue[batch_size:]
        wavs = np.stack([self._crop(s) for s in speakers])
        return torch.from_numpy(wavs), torch.tensor(speakers, dtype=torch.long)

    def _crop(self, speaker: int) -> np.ndarray:
        clips = self.data.clips[speaker]
        clip = clips[self.rng.choice(len(clips), p=self._weights[speaker])]
        if len(clip) <= self.crop:
            start = int(self.rng.integers(0, len(clip)))
            return np.resize(np.roll(clip, -start), self.crop)
        start = int(self.rng.integers(0, len(clip) - self.crop + 1))
        return clip[start : start + self.crop]


def augment(
    wavs: torch.Tensor,
    gen: torch.Generator,
    *,
    noise_prob: float = 0.6,
    snr_db: tuple[float, float] = (5.0, 20.0),
    gain_db: tuple[float, float] = (-6.0, 6.0),
) -> torch.Tensor:
    """Additive coloured noise at a random SNR, then a random gain; ``(B, T)`` in, ``(B, T)`` out.

    Noise colour is drawn per item from white / pink / brown (power ∝ 1/f^k, k = 0, 1, 2), shaped in
    the frequency domain. The gain mostly matters through its interaction with Fbank's log floor:
    sentence mean normalisation removes a constant log-gain.
    """
    b, t = wavs.shape
    apply = (torch.rand(b, generator=gen) < noise_prob).float()
    exponent = torch.randint(0, 3, (b,), generator=gen).float()
    spec = torch.fft.rfft(torch.randn(b, t, generator=gen), dim=1)
    freqs = torch.arange(spec.shape[1], dtype=torch.float32).clamp(min=1.0)
    noise = torch.fft.irfft(spec * freqs.pow(-exponent[:, None] / 2), n=t, dim=1)
    snr = snr_db[0] + (snr_db[1] - snr_db[0]) * torch.rand(b, generator=gen)
    p_signal = wavs.pow(2).mean(dim=1).clamp(min=1e-8)
    p_noise = noise.pow(2).mean(dim=1).clamp(min=1e-12)
    noise_scale = torch.sqrt(p_signal / (p_noise * 10.0 ** (snr / 10.0))) * apply
    gain = 10.0 ** ((gain_db[0] + (gain_db[1] - gain_db[0]) * torch.rand(b, generator=gen)) / 20.0)
    return (wavs + noise * noise_scale[:, None]) * gain[:, None]


# --------------------------------------------------------------------------------------------------
# Optimisation


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``MIN_LR_FRACTION``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit(
    data: TrainingData,
    params: ModelParams,
    cfg: EcapaConfig,
    *,
    device: torch.device,
    progress: bool = True,
) -> tuple[torch.nn.Module, AAMHead, dict[str, list[float]]]:
    """Run ``params.steps`` AAM-softmax steps; returns the model, the head and per-step loss/acc."""
    torch.manual_seed(params.seed)  # model init is part of the seeded run
    model = cfg.build().to(device).train()
    head = AAMHead(cfg.lin_neurons, len(data.labels), margin=params.aam_margin, scale=params.aam_scale)
    head = head.to(device).train()
    fbank = cfg.build_fbank().to(device)
    norm = cfg.build_norm().to(device)

    trainable = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)
    warmup = max(1, round(WARMUP_FRACTION * params.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, params.steps, warmup))

    sampler = CropSampler(data, int(round(params.crop_s * audio.TARGET_SR)), np.random.default_rng(params.seed))
    noise_gen = torch.Generator().manual_seed(params.seed + 1)
    use_amp = device.type == "cuda"
    history: dict[str, list[float]] = {"loss": [], "acc": []}

    bar = tqdm(range(params.steps), desc="train ecapa", unit="step", disable=not progress)
    for _ in bar:
        wavs, targets = sampler.batch(params.batch_size)
        wavs = augment(wavs, noise_gen).to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        lengths = torch.ones(wavs.shape[0], device=device)  # fixed-size crops: no padding
        with torch.no_grad():
            feats = norm(fbank(wavs), lengths)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            emb = model(feats, lengths)
        loss, cosines = head(emb, targets)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        scheduler.step()

        acc = (cosines.argmax(dim=1) == targets).float().mean()
        history["loss"].append(float(loss.detach()))
        history["acc"].append(float(acc))
        if progress:
            recent = slice(-10, None)
            bar.set_postfix(
                loss=f"{_mean(history['loss'][recent]):.3f}",
                acc=f"{_mean(history['acc'][recent]):.2f}",
                lr=f"{scheduler.get_last_lr()[0]:.1e}",
            )
    return model, head, history


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None
