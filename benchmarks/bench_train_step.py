"""Seconds a training step of the ``model`` stage takes, split into its parts, in bf16 and float32.

The model stage's wall time is ``model.steps`` times this step, so this is the number that says
whether a machine fits the 10-minute budget (and whether ``model.amp`` pays on it). One step here
is the default recipe's step on synthetic audio: a batch of ``--batch`` crops of ``--crop-s``
seconds through the default waveform augmentation (coloured noise, reverberation, speed
perturbation over five speeds; ``nonspeech`` needs the project's data and is left out), Fbank and
sentence normalisation, SpeechBrain's ``ECAPA_TDNN`` of ``--channels`` under bf16 autocast or in
float32, the AAM-softmax head over ``--classes`` classes, backward, gradient clipping and Adam.

Rounds alternate between the precisions (bf16, float32, bf16, ...) so drift in machine speed hits
both; the median of each part over the timed steps is reported, one JSON record per precision.
bf16 is measured only where :func:`voiceprint.common.precision.training_autocast_dtype` would use it.

    python benchmarks/bench_train_step.py [--channels 128] [--batch 32] [--steps 10] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, hardware  # noqa: E402
from voiceprint.common import audio  # noqa: E402
from voiceprint.common.precision import training_autocast_dtype  # noqa: E402
from voiceprint.config import ModelParams  # noqa: E402
from voiceprint.encoders.ecapa import EcapaConfig  # noqa: E402
from voiceprint.training.aam import AAMHead  # noqa: E402
from voiceprint.training.augment import Augmenter  # noqa: E402
from voiceprint.training.loop import GRAD_CLIP  # noqa: E402

PARTS = ("augment", "features", "forward", "backward", "optimizer")
BENCH = "train_step"


class StepRig:
    """The default recipe's training step on synthetic audio, timed part by part."""

    def __init__(self, channels: int, batch: int, crop_s: float, classes: int, seed: int = 0):
        defaults = ModelParams()
        torch.manual_seed(seed)
        self.cfg = EcapaConfig.from_channels(channels, lin_neurons=defaults.lin_neurons)
        self.model = self.cfg.build().train()
        self.head = AAMHead(defaults.lin_neurons, classes, margin=defaults.aam.margin, scale=defaults.aam.scale)
        self.fbank, self.norm = self.cfg.build_fbank(), self.cfg.build_norm()
        self.trainable = [*self.model.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.Adam(self.trainable, lr=defaults.lr, weight_decay=defaults.weight_decay)
        kinds = [k for k in defaults.augment.kinds if k != "nonspeech"]
        self.augmenter = Augmenter(kinds, int(round(crop_s * audio.TARGET_SR)), None, defaults.augment.speeds)
        self.gen = torch.Generator().manual_seed(seed)
        self.source = torch.randn(batch, self.augmenter.source_samples, generator=self.gen) * 0.1
        self.targets = torch.randint(0, classes, (batch,), generator=self.gen)

    def step(self, bf16: bool) -> dict[str, float]:
        clock = [time.perf_counter()]
        wavs, _ = self.augmenter.apply(self.source, self.gen)
        clock.append(time.perf_counter())
        lengths = torch.ones(wavs.shape[0])
        with torch.no_grad():
            feats = self.norm(self.fbank(wavs), lengths)
        clock.append(time.perf_counter())
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = self.model(feats, lengths)
        loss, _ = self.head(emb, self.targets)
        clock.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.trainable, GRAD_CLIP)
        self.optimizer.step()
        clock.append(time.perf_counter())
        return {part: b - a for part, a, b in zip(PARTS, clock, clock[1:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=ModelParams().channels)
    ap.add_argument("--batch", type=int, default=ModelParams().batch_size)
    ap.add_argument("--crop-s", type=float, default=ModelParams().crop_s)
    ap.add_argument("--classes", type=int, default=1255, help="AAM classes (the default data: 251 speakers x 5 speeds)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per precision and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    rig = StepRig(args.channels, args.batch, args.crop_s, args.classes)
    native_bf16 = training_autocast_dtype(torch.device("cpu"), True) is not None
    precisions = ["bfloat16", "float32"] if native_bf16 else ["float32"]
    timed: dict[str, list[dict[str, float]]] = {p: [] for p in precisions}
    for _ in range(args.rounds):
        for precision in precisions:
            bf16 = precision == "bfloat16"
            for _ in range(args.warmup):
                rig.step(bf16)
            timed[precision] += [rig.step(bf16) for _ in range(args.steps)]
    for precision, steps in timed.items():
        parts = {part: round(statistics.median(s[part] for s in steps), 4) for part in PARTS}
        emit(
            {
                "bench": BENCH,
                "precision": precision,
                "channels": args.channels,
                "batch": args.batch,
                "crop_s": args.crop_s,
                "classes": args.classes,
                "timed_steps": len(steps),
                "seconds_per_step": round(statistics.median(sum(s.values()) for s in steps), 4),
                **{f"{part}_s": v for part, v in parts.items()},
                "hardware": hardware(threads=torch.get_num_threads()),
            },
            args.out,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
