"""Typed view of ``params.yaml``.

Every stage reads its parameters through :func:`load_params` so that a typo or a wrong type is
reported *before* any work starts, naming the key and the allowed values (pydantic with
``extra="forbid"``), instead of surfacing as a KeyError twenty minutes into a run.

Each field's ``description`` is that parameter's documentation, written once: ``docs/configuration.md``
is generated from them (``python scripts/gen_config_docs.py``), and ``params.yaml`` carries values only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A parameter file that cannot be used; the message names the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DatasetKind = Literal["librispeech-excerpts", "librispeech", "folder", "voxceleb", "speech-commands"]
ModelInit = Literal["scratch", "pretrained", "distill"]
ModelArch = Literal["ecapa", "moe"]
IndexType = Literal["flat", "ivf", "hnsw"]

#: Kinds whose files live under ``data.path`` (required) rather than in the mirror or a download.
PATH_KINDS = ("folder", "voxceleb")
#: Kinds read from LibriSpeech subsets (``train_subset`` / ``eval_subset``).
LIBRISPEECH_KINDS = ("librispeech-excerpts", "librispeech")
#: A source name: a metrics.json block, an MLflow metric prefix and a `data.train` entry.
SOURCE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


class SourceParams(_Section):
    """One dataset source: where its audio comes from and how it splits into train and eval speakers."""

    dataset: DatasetKind = Field(
        default="librispeech-excerpts",
        description="What to prepare: `librispeech-excerpts` (short excerpts of LibriSpeech subsets), "
        "`librispeech` (whole subsets), `speech-commands` (Speech Commands v0.02 test clips grouped by "
        "speaker, one-second words; speakers split in halves by a fixed rule, see docs/stages.md#prepare), `folder` (your "
        "own recordings under `data.path`) or `voxceleb` (VoxCeleb1/2 as distributed, "
        "`idXXXXX/<video>/<nnnnn>.{wav,m4a}` under `data.path`; speaker `idXXXXX`, utterance id "
        "`idXXXXX-<video>-<nnnnn>`: the path in VoxCeleb's trial lists with '/' read as '-').",
    )
    path: str | None = Field(
        default=None,
        description="`folder` datasets: a tree of `<speaker>/<utterance>.<ext>` (ext: wav, flac, m4a, mp3, ogg, "
        "opus); `voxceleb`: `<speaker>/<video>/<utterance>.<ext>`. Either optionally split into `train/` and "
        "`test/` (without them everything is evaluated); a relative path is resolved against the project root. "
        "`speech-commands`: the folder of speaker folders (null: `speech-commands-test/` in `data.mirror`).",
    )
    train_subset: str | None = Field(
        default="train-clean-100",
        description="LibriSpeech subset (and excerpts) that trains the model and supplies the identification "
        "distractors and the AS-norm cohort; null: no train split.",
    )
    eval_subset: str = Field(
        default="test-other",
        description="LibriSpeech subset (and excerpts) that is evaluated: verification trials and "
        "identification queries.",
    )
    max_speakers: int | None = Field(
        default=None,
        ge=1,
        description="Keep the first N speakers of each split (sorted by id), for quick runs; null: all.",
    )
    max_utterances_per_speaker: int | None = Field(
        default=None,
        ge=1,
        description="Keep each speaker's first N utterances (sorted by id), for quick runs; null: all.",
    )

    @model_validator(mode="after")
    def _folder_needs_path(self) -> SourceParams:
        if self.dataset in PATH_KINDS and not self.path:
            raise ValueError(f"data.path is required when data.dataset is '{self.dataset}'")
        return self


class DataParams(SourceParams):
    """Where the audio comes from, and which part of it trains the model and which is evaluated.

    The keys at this level describe the primary source (named `data.name`); `data.sources` adds more,
    each prepared into the same manifest with its own eval set.
    """

    name: str | None = Field(
        default=None,
        pattern=f"^{SOURCE_NAME}$",
        description="Name of the primary source (its metrics.json block and `data.train` entry); null: "
        "`librispeech` for the LibriSpeech kinds, else the kind (`folder`, `voxceleb`, `speech-commands`).",
    )
    mirror: str | None = Field(
        default="../shared/datasets",
        description="Local mirror searched before the network; a relative path is resolved against the "
        "project root. null: no mirror.",
    )
    url_base: str = Field(
        default="https://www.openslr.org/resources/12",
        description="Where LibriSpeech archives are downloaded from when no mirror holds them.",
    )
    sources: dict[str, SourceParams] = Field(
        default_factory=dict,
        description="More sources, by name (e.g. `speech-commands: {dataset: speech-commands}`), each with the "
        "keys of the primary source (`dataset`, `path`, `train_subset`, `eval_subset`, `max_*`). Each has its "
        "own eval set; their train splits join the primary's as `data.train` says.",
    )
    train: list[str] | None = Field(
        default=None,
        description="Sources whose train split is kept (training, identification distractors, AS-norm cohort); "
        "null: every source's. Speakers are pooled by id: one speaker in two sources is one class. Batches are "
        "speaker-balanced over the pool (each speaker once per pass), so a source weighs by its speakers.",
    )

    @model_validator(mode="after")
    def _sources_are_consistent(self) -> DataParams:
        names = list(self.all_sources())
        bad = [n for n in self.sources if not re.fullmatch(SOURCE_NAME, n)]
        if bad:
            raise ValueError(f"data.sources names must be letters, digits, '_', '.', '-': {bad}")
        if self.primary_name in self.sources:
            raise ValueError(
                f"data.sources has a source named {self.primary_name!r}, the primary source's name (data.name)"
            )
        unknown = [n for n in self.train or [] if n not in names]
        if unknown:
            raise ValueError(f"data.train names unknown source(s) {unknown}; the sources are {names}")
        return self

    @property
    def primary_name(self) -> str:
        if self.name:
            return self.name
        return "librispeech" if self.dataset in LIBRISPEECH_KINDS else self.dataset

    def all_sources(self) -> dict[str, SourceParams]:
        """Every source by name, the primary first."""
        primary = SourceParams(**{k: getattr(self, k) for k in SourceParams.model_fields})
        return {self.primary_name: primary, **self.sources}

    def trains(self, name: str) -> bool:
        """Whether source ``name``'s train split is kept."""
        return self.train is None or name in self.train


class VadParams(_Section):
    """Voice activity detection: which stretches of each file are speech, and how they are cut into segments."""

    method: Literal["silero", "energy"] = Field(
        default="silero",
        description="`silero` (the Silero VAD network) or `energy` (frames within 35 dB of the loudest one; "
        "only as an explicit choice).",
    )
    threshold: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="`silero`: speech probability above which a frame is speech."
    )
    min_speech_s: float = Field(default=0.25, ge=0.0, description="Speech stretches shorter than this are dropped.")
    min_silence_s: float = Field(
        default=0.1, ge=0.0, description="Pauses shorter than this do not split a stretch of speech."
    )
    max_segment_s: float = Field(
        default=10.0, gt=0.0, description="Longer speech is split into equal segments no longer than this."
    )
    min_segment_s: float = Field(
        default=0.5,
        ge=0.0,
        description="Segments shorter than this are dropped; a file shorter than this is rejected.",
    )
    pad_s: float = Field(default=0.03, ge=0.0, description="Seconds added before and after each stretch of speech.")


class AamParams(_Section):
    """AAM-softmax (additive angular margin) speaker classification: the objective of scratch training
    and fine-tuning, and distillation's optional speaker loss."""

    margin: float = Field(
        default=0.3, ge=0.0, description="Angular margin m added to the angle of the target class (once ramped up)."
    )
    scale: float = Field(default=30.0, gt=0.0, description="Scale s of the cosine logits.")
    margin_ramp: tuple[float, float] = Field(
        default=(0.1, 0.4),
        description="[start, end] fractions of the steps: margin 0 until start, then rising linearly to "
        "`model.aam.margin` at end (WeSpeaker's margin scheduler); [0, 0]: the full margin from the first step.",
    )
    centres: Literal["teacher", "learned"] = Field(
        default="teacher",
        description="`teacher`: each class centre is fixed at the bundled CAM++'s embedding of that class's "
        "speech, so the student inherits the teacher's map of which voices are alike (needs 192-dimensional "
        "embeddings); `learned`: trained, as in plain AAM-softmax. Scratch and fine-tuning.",
    )
    teacher_centre_s: float = Field(
        default=4.0,
        gt=0.0,
        description="`centres: teacher`: seconds of each speaker's training speech (per speed) the teacher embeds.",
    )

    @model_validator(mode="after")
    def _margin_ramp_is_ordered(self) -> AamParams:
        start, end = self.margin_ramp
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"model.aam.margin_ramp {list(self.margin_ramp)} must be [start, end] fractions of the "
                "steps with 0 <= start <= end <= 1"
            )
        return self


class DistillParams(_Section):
    """`model.init: distill`: the student learns to point its embeddings where the bundled CAM++ teacher does."""

    crops_per_segment: int = Field(
        default=4,
        ge=1,
        description="Fixed crops per train segment whose teacher embeddings are computed once and cached "
        "(data/teacher_cache/).",
    )
    aam_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the AAM-softmax speaker loss added to the student-teacher cosine loss; 0: cosine "
        "only (the classifier still learns the speakers, without shaping the student).",
    )


class MoeParams(_Section):
    """`model.arch: moe`: a small CNN gate over the log-mel input mixes several ECAPA-TDNN experts."""

    experts: int = Field(default=4, ge=2, description="Number of ECAPA-TDNN experts.")
    expert_channels: int = Field(
        default=40,
        ge=8,
        description="Width C of each expert; four of C=40 plus the gate have the parameters of one C=128 ECAPA-TDNN.",
    )
    gate_channels: int = Field(default=64, ge=4, description="Convolution width of the gate.")
    balance: float = Field(
        default=0.01,
        ge=0.0,
        description="Weight of the load-balancing loss that keeps the batch-average gate from collapsing onto "
        "one expert.",
    )


class AugmentParams(_Section):
    """Training augmentation of the crops (voiceprint.training.augment)."""

    kinds: list[
        Literal["noise", "nonspeech", "reverb", "speed", "specaug", "telephone", "codec", "loudness", "shortcrop"]
    ] = Field(
        default_factory=lambda: ["noise", "nonspeech", "reverb", "speed"],
        description="Any of `noise` (coloured noise and a random gain), `nonspeech` (noise cut from the gaps "
        "VAD left in the training files), `reverb` (synthetic room impulse responses), `speed` (speed "
        "perturbation by `model.augment.speeds`), `specaug` (masks over log-mel frames and bands), "
        "`telephone` (a narrow-band phone channel on `model.augment.telephone_share` of the crops: "
        "300-3,400 Hz, 8 kHz, G.711 mu-law on half of those), `codec` (an Opus or MP3 round trip at a low "
        "bitrate on 30 % of the crops, through PyAV), `loudness` (a -30 to +20 dB gain in place of the +-6 dB "
        "one, and hard clipping of 0.1-5 % of the samples on 30 % of the crops) and `shortcrop` (each batch "
        "cut to one random length from `model.augment.min_crop_s` to `model.crop_s`).",
    )
    min_crop_s: float = Field(
        default=1.0,
        gt=0,
        description="`shortcrop`: the shortest crop, in seconds (capped at `model.crop_s`); each batch's length "
        "is drawn uniformly between it and `model.crop_s`.",
    )
    telephone_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="`telephone`: the share of crops sent through the phone channel. On the default recipe even "
        "0.2 cost 2 points of EER on both wideband sets and gained nothing resolved on their telephone copies "
        "(docs/experiments/2026-12-07-recipe-table.md): for a telephone deployment, not the default.",
    )
    speeds: tuple[float, ...] = Field(
        default=(0.8, 0.9, 1.0, 1.1, 1.2),
        description="The speeds `speed` plays crops at (sorted, 1.0 included). With `speed_as_speakers` each "
        "other speed adds a block of AAM classes, and with teacher centres a teacher pass.",
    )
    speed_as_speakers: bool = Field(
        default=True,
        description="A crop played at another speed counts as another speaker in AAM-softmax (WeSpeaker's "
        "recipe). Acts where AAM trains on speed-perturbed crops (scratch and fine-tuning with `speed` in "
        "`kinds`); distillation never perturbs the speed.",
    )

    @model_validator(mode="after")
    def _speeds_are_usable(self) -> AugmentParams:
        speeds = self.speeds
        if 1.0 not in speeds or list(speeds) != sorted(set(speeds)) or not all(0.5 <= v <= 2.0 for v in speeds):
            raise ValueError(
                f"model.augment.speeds {list(speeds)} must be distinct, sorted, between 0.5 and 2.0, and include "
                "1.0 (the unperturbed crop)"
            )
        return self


class ModelParams(_Section):
    """The `model` stage: train a speaker encoder on the train split, adopt a pretrained one, or fine-tune it."""

    init: ModelInit = Field(
        default="scratch",
        description="`scratch`: train on the train split; `pretrained`: adopt `model.source` (fine-tuned when "
        "`model.finetune_steps` > 0); `distill`: train a student to reproduce the bundled CAM++.",
    )
    arch: ModelArch = Field(
        default="ecapa",
        description="`ecapa`: one ECAPA-TDNN of `model.channels`; `moe`: a gated mixture of ECAPA-TDNN experts "
        "(`model.moe`), trained by `scratch` or `distill`.",
    )
    source: str = Field(
        default="speechbrain/spkrec-ecapa-voxceleb",
        description="`init: pretrained`: Hugging Face repo id or local directory in SpeechBrain's layout.",
    )
    channels: int = Field(
        default=128,
        ge=8,
        description="ECAPA-TDNN width C (layers of C, C, C, C and 3C channels; SpeechBrain's released model: 1024).",
    )
    lin_neurons: int = Field(default=192, ge=8, description="Embedding size.")
    n_mels: int = Field(default=80, ge=8, description="Mel bands of the log-mel front end.")
    steps: int = Field(default=1000, ge=0, description="Training steps (scratch and distill).")
    finetune_steps: int = Field(
        default=0,
        ge=0,
        description="`init: pretrained`: AAM-softmax steps adapting `model.source` to this dataset's train split, "
        "with scratch training's settings; 0: use it as is.",
    )
    batch_size: int = Field(
        default=32, ge=1, description="Crops per step; every speaker appears once per pass over the speakers."
    )
    balance: Literal["speakers", "sources"] = Field(
        default="speakers",
        description="How batches share out the train split. `speakers`: every speaker once per pass, so a "
        "source weighs by its speakers. `sources`: every source the same share of each pass, its speakers "
        "cycled in turn (a smaller source's speakers come round more often); a speaker found in two sources "
        "belongs to the one of its first segment.",
    )
    crop_s: float = Field(default=2.0, gt=0.0, description="Seconds of each training crop.")
    lr: float = Field(
        default=0.002,
        gt=0.0,
        description="Adam's peak learning rate: linear warm-up over the first 10 % of the steps, then cosine "
        "decay to 1 % of it.",
    )
    weight_decay: float = Field(default=2e-5, ge=0.0, description="Adam's weight decay.")
    seed: int = Field(
        default=0,
        description="Seeds every random draw of training; the same seed, data and device give the same weights.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto` (CUDA when available, else CPU), `cpu` or `cuda`."
    )
    amp: bool = Field(
        default=True,
        description="bf16 autocast for the encoder's forward where the hardware runs it natively (CUDA with bf16, "
        "CPUs with AVX512-BF16 or AMX); the AAM cosines stay float32.",
    )
    average_last: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Save the mean of the weights over this last fraction of the steps (a snapshot every 10 "
        "steps, WeSpeaker's model averaging); 0: the last step's weights. Scratch and fine-tuning.",
    )
    centre_embeddings: bool = Field(
        default=True,
        description="Shift the trained ECAPA-TDNN's final bias so that its embeddings of the training segments "
        "have mean zero (WeSpeaker's mean subtraction, folded into the checkpoint). Scratch and fine-tuning; "
        "a mixture of experts is left as trained.",
    )
    wccn: float | None = Field(
        default=None,
        ge=0.0,
        description="After centring, fold within-class covariance normalisation into the same final layer: "
        "(S_w + wccn I)^(-1/2) of the training segments' within-speaker scatter scaled to mean eigenvalue 1, "
        "so the value is a relative regulariser; null: off. Needs `model.centre_embeddings`.",
    )
    checkpoint_every: int = Field(
        default=100,
        ge=0,
        description="Snapshot the training state to data/train_state/ every N steps and resume from it after a "
        "kill; 0: never. Operational: it never changes the weights.",
    )
    log_every: int = Field(
        default=10,
        ge=0,
        description="Log training loss, accuracy and learning rate to MLflow every N steps; 0: the final "
        "summary only. Operational.",
    )
    register_model: bool = Field(
        default=True,
        description="Register the trained encoder in the MLflow model registry as a pyfunc (voiceprint-ecapa). "
        "Operational.",
    )
    aam: AamParams = Field(default_factory=AamParams, description="AAM-softmax speaker classification.")
    distill: DistillParams = Field(default_factory=DistillParams, description="Distillation from CAM++.")
    moe: MoeParams = Field(default_factory=MoeParams, description="The mixture of experts.")
    augment: AugmentParams = Field(default_factory=AugmentParams, description="Training augmentation.")

    @model_validator(mode="after")
    def _wccn_follows_centring(self) -> ModelParams:
        if self.wccn is not None and not self.centre_embeddings:
            raise ValueError("model.wccn needs model.centre_embeddings: true (it whitens the centred embeddings)")
        return self

    @property
    def speed_pseudo_speakers(self) -> bool:
        """Whether speed-perturbed crops really train as other speakers: ``augment.speed_as_speakers``
        acts only where ``speed`` perturbs the crops."""
        return self.augment.speed_as_speakers and "speed" in self.augment.kinds

    @model_validator(mode="after")
    def _moe_is_trained_here(self) -> ModelParams:
        if self.arch == "moe" and self.init == "pretrained":
            raise ValueError(
                "model.arch 'moe' needs model.init 'scratch' or 'distill': the experts are trained here "
                "(a pretrained SpeechBrain checkpoint is a single ECAPA-TDNN; use arch 'ecapa' for it)"
            )
        return self


class EmbedParams(_Section):
    """The `embed` stage: an embedding of every segment and every utterance."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto` (CUDA when available, else CPU), `cpu` or `cuda`."
    )
    max_batch_s: float = Field(
        default=120.0,
        gt=0.0,
        description="Audio seconds per length-bucketed batch (batches are capped by audio, not by item count).",
    )
    amp: bool = Field(
        default=True,
        description="bf16 autocast where the hardware runs it natively (CUDA, CPUs with AVX512-BF16 or AMX), "
        "fp16 on GPUs without bf16.",
    )
    backend: Literal["torch", "openvino"] = Field(
        default="torch",
        description="What runs the network after the features (which stay torch float32): `torch` (eager, "
        "`amp` autocast) or `openvino` (CPU only: OpenVINO with bf16 inference precision where the CPU has "
        "native bf16 and `amp` is true, else f32; recorded as precision `openvino-bf16`/`openvino-f32`, same "
        "`model_id`). Needs `device: cpu`, or `auto` on a machine without CUDA.",
    )
    cpu_batching: Literal["auto"] | bool = Field(
        default="auto",
        description="On CPU: length-bucketed batches (true) or one segment per call (false); `auto`: batches "
        "for models below 10 M parameters, which gain from them where large ones lose.",
    )
    utterance: Literal["file", "segments"] = Field(
        default="file",
        description="The utterance embedding: one encoder pass over the whole file (`file`) or the mean of its "
        "VAD segments' embeddings (`segments`).",
    )
    utterance_chunk_s: float = Field(
        default=60.0,
        gt=0.0,
        description="`utterance: file`: longer files are embedded in equal chunks of at most this many seconds, "
        "averaged.",
    )

    @model_validator(mode="after")
    def _openvino_runs_on_cpu(self) -> EmbedParams:
        if self.backend == "openvino" and self.device == "cuda":
            raise ValueError("embed.backend openvino runs on CPU only: set embed.device to cpu (or auto without CUDA)")
        return self


class IndexParams(_Section):
    """The `index` stage: a faiss index of the embeddings for nearest-neighbour search by cosine."""

    type: IndexType = Field(
        default="flat", description="`flat` (exact), `ivf` (inverted lists) or `hnsw` (a proximity graph)."
    )
    nlist: int = Field(
        default=64,
        ge=1,
        description="`ivf`: number of lists, reduced when there are too few vectors to train that many.",
    )
    nprobe: int = Field(default=8, ge=1, description="`ivf`: lists scanned per query.")
    hnsw_m: int = Field(default=32, ge=2, description="`hnsw`: links per node.")
    ef_search: int = Field(default=128, ge=1, description="`hnsw`: candidate list size while searching.")
    ef_construction: int = Field(default=200, ge=1, description="`hnsw`: candidate list size while building.")
    use_gpu: Literal["auto", "never"] = Field(
        default="auto",
        description=(
            "`auto`: on the GPU when faiss has one, build `ivf` indexes and search `flat` and `ivf` "
            "ones in evaluate (a `flat` index is written from the embeddings, not built); `never`: CPU only."
        ),
    )


ALL_PAIRS = "all-pairs"
_SAMPLED = re.compile(r"sampled:(.*)")


def parse_trials(spec: str) -> tuple[Literal["all-pairs", "sampled", "file"], int | str | None]:
    """The three forms of ``evaluate.trials``: ``("all-pairs", None)``, ``("sampled", N)`` or ``("file", path)``.

    Raises ValueError naming the key for an empty value or a ``sampled:`` whose N is not a whole
    number >= 2. Anything else is the path of a trial file (existence: :func:`check_trials_path`).
    """
    if spec == ALL_PAIRS:
        return "all-pairs", None
    sampled = _SAMPLED.fullmatch(spec)
    if sampled:
        count = sampled.group(1).replace("_", "")
        if not count.isdigit() or int(count) < 2:
            raise ValueError(
                f"evaluate.trials {spec!r}: sampled:N needs a whole number of trials N >= 2 (e.g. sampled:40000)"
            )
        return "sampled", int(count)
    if not spec.strip():
        raise ValueError("evaluate.trials is empty: expected all-pairs, sampled:N or the path of a trial file")
    return "file", spec


def check_trials_path(cfg: EvaluateParams, root: Path, source: Path | str = "params.yaml") -> Path | None:
    """The trial file of ``evaluate.trials`` resolved against the project ``root``; ConfigError when it is no file.

    None for ``all-pairs`` and ``sampled:N``.
    """
    kind, value = parse_trials(cfg.trials)
    if kind != "file":
        return None
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(
            f"{source}: invalid parameters: evaluate.trials: trial file {path} {reason} "
            f"(evaluate.trials={cfg.trials!r}: expected {ALL_PAIRS}, sampled:N or the path of a trial file "
            f"in the VoxCeleb format, relative paths resolved against {root})"
        )
    return path


class BackendParams(_Section):
    """The scoring back-end of each eval set, fitted on the train split of the set's own source."""

    centre: Literal["none", "source"] = Field(
        default="source",
        description="`source`: subtract the mean of the set's source train-split embeddings (unlabelled "
        "in-domain speech) from every embedding the set is scored with, then re-normalise, as WeSpeaker's "
        "`cal_mean` does; a source without a train split is scored uncentred. `none`: the raw cosine.",
    )
    lda_dim: int | None = Field(
        default=None,
        ge=1,
        description="LDA to this many dimensions (scikit-learn's, SVD solver), fitted "
        "after centring on the set's source train split, on the speakers with two or more utterances there; "
        "a set whose source has fewer such speakers than `lda_dim + 1` is scored without it (LibriSpeech "
        "excerpts: one train utterance per speaker). null: no LDA. 64 takes the default model from 17.7 % to "
        "14.6 % EER on speech-commands but CAM++ and GE2E up (docs/stages.md#scoring-back-end), hence off.",
    )


class EvaluateParams(_Section):
    """The `evaluate` stage: speaker verification and identification on the eval split."""

    trials: str = Field(
        default=ALL_PAIRS,
        description="Verification trials. `all-pairs`: every pair of eval utterances (refused above 10^8 "
        "trials, ~14,100 utterances, which need ~15 GB); `sampled:N`: N trials drawn with `evaluate.seed`, "
        "half same-speaker and half different-speaker, no self or repeated pairs; or the path of a trial file "
        "in the VoxCeleb format, relative to the project root (one `LABEL UTT UTT` per line, e.g. "
        "`1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav`; label 1 = same speaker). "
        "Matching rule and errors: voiceprint/evaluate/trials.py.",
    )

    enroll_per_speaker: int = Field(
        default=3,
        ge=1,
        description="Identification: utterances of each eval speaker that are enrolled; the others are queries.",
    )
    train_distractors: bool = Field(
        default=True, description="Add the training speakers to the identification gallery as distractors."
    )
    p_targets: list[float] = Field(
        default_factory=lambda: [0.01, 0.05], description="Target priors at which minDCF is reported."
    )
    c_miss: float = Field(default=1.0, description="minDCF: cost of a miss.")
    c_fa: float = Field(default=1.0, description="minDCF: cost of a false alarm.")
    seed: int = Field(
        default=0, description="Seeds the choice of enrolled utterances, the bootstrap and `sampled:N` trials."
    )
    snorm_top_k: int = Field(
        default=100,
        ge=0,
        description="Adaptive s-norm (AS-norm), reported beside the raw cosine scores: the train-split "
        "utterances are the impostor cohort, and the top K cohort scores of each side of a trial normalise "
        "it; 0: not computed.",
    )
    bootstrap: int = Field(
        default=1000,
        ge=0,
        description="Speaker-level bootstrap replicates for the intervals of eer, eer_snorm and top1 "
        "(voiceprint.evaluate.bootstrap); 0: off.",
    )
    bootstrap_level: float = Field(default=0.95, gt=0.0, lt=1.0, description="Coverage of the bootstrap intervals.")
    backend: BackendParams = Field(
        default_factory=BackendParams,
        description="How each set's embeddings are prepared for scoring (verification, AS-norm, "
        "identification): docs/stages.md#scoring-back-end. The encoder comparison uses the same back-end.",
    )
    sets: dict[str, str | None] | None = Field(
        default=None,
        description="The eval sets, by source name (`data.name`, `data.sources`), each with its own trials "
        "(null: `evaluate.trials`), e.g. `{librispeech: null, speech-commands: 'sampled:200000'}`. Each set is "
        "its source's eval split, scored on its own: one block per set in metrics.json, metric names prefixed "
        "with the set in MLflow. The train splits of all sources stay the shared distractors and AS-norm "
        "cohort. null: every source's eval split.",
    )

    @model_validator(mode="after")
    def _trials_form(self) -> EvaluateParams:
        parse_trials(self.trials)
        for spec in (self.sets or {}).values():
            if spec is not None:
                parse_trials(spec)
        return self


class CompareParams(_Section):
    """The `compare` stage: several encoders embed the same segments and are scored side by side."""

    encoders: dict[str, str] = Field(
        default_factory=lambda: {"ecapa": "ecapa", "campplus": "campplus", "ge2e": "ge2e"},
        min_length=1,
        description="Name -> encoder spec (voiceprint.encoders.loader): `ecapa` (this pipeline's model), "
        "`campplus` (bundled CAM++), `ge2e` (bundled GE2E), `speechbrain:DIR` or `onnx:FILE`. Names become "
        "DVC stage items (compare-encoder@NAME) and folders (data/compare/NAME).",
    )
    umap_neighbors: int = Field(default=15, ge=2, description="Neighbours per point of the UMAP projection.")
    seed: int = Field(default=0, description="Seeds the UMAP projection.")

    @model_validator(mode="after")
    def _names_are_slugs(self) -> CompareParams:
        bad = [n for n in self.encoders if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n)]
        if bad:
            raise ValueError(f"compare.encoders names must be letters, digits, '_', '.', '-': {bad}")
        return self


class ComputeParams(_Section):
    """Where `segment` and `embed` run (voiceprint/compute). Not a stage param: no output depends on it."""

    engine: Literal["local", "dask"] = Field(
        default="local",
        description="`local`: one process, as always. `dask`: the stage is split into shards that Dask "
        "workers run, each loading the model once; the driver merges their Parquet parts.",
    )
    address: str = Field(
        default="local:2",
        description="`engine: dask` only. A scheduler address (`tcp://host:8786`), or `local:N` for a "
        "`LocalCluster` of N worker processes on this machine (`local-cuda` for one worker per GPU, "
        "with dask-cuda installed).",
    )
    shard_s: float = Field(
        default=600.0,
        gt=0.0,
        description="Seconds of audio per shard: the unit a worker takes, writes as one part and redoes after a crash.",
    )
    threads_per_worker: int | None = Field(
        default=None,
        ge=1,
        description="Torch threads in each worker; null: the host's cores divided by its workers.",
    )
    retries: int = Field(default=2, ge=0, description="Times a shard whose worker died is retried elsewhere.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value == "local-cuda" or re.fullmatch(r"local:[1-9][0-9]*", value):
            return value
        if re.fullmatch(r"(tcp|tls|ucx|inproc)://\S+", value):
            return value
        raise ValueError(f"compute.address must be tcp://host:port, local:N or local-cuda (got {value!r})")


class Params(_Section):
    """Every parameter of the pipeline (``params.yaml``), one section per stage."""

    data: DataParams = Field(default_factory=DataParams, description="Datasets and splits (`prepare` stage).")
    vad: VadParams = Field(default_factory=VadParams, description="Voice activity detection (`segment` stage).")
    model: ModelParams = Field(default_factory=ModelParams, description="The speaker encoder (`model` stage).")
    embed: EmbedParams = Field(default_factory=EmbedParams, description="Embeddings (`embed` stage).")
    index: IndexParams = Field(default_factory=IndexParams, description="The search index (`index` stage).")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Metrics (`evaluate` stage).")
    compare: CompareParams = Field(default_factory=CompareParams, description="Encoder comparison (`compare` stage).")
    compute: ComputeParams = Field(
        default_factory=ComputeParams,
        description="Execution engine of `segment` and `embed` (no output depends on it).",
    )

    @model_validator(mode="after")
    def _sets_name_sources(self) -> Params:
        names = list(self.data.all_sources())
        unknown = [n for n in self.evaluate.sets or {} if n not in names]
        if unknown:
            raise ValueError(f"evaluate.sets names unknown source(s) {unknown}; the sources are {names}")
        return self


def eval_sets(params: Params) -> dict[str, EvaluateParams]:
    """Each eval set's name and its evaluate section (``trials`` resolved), in ``evaluate.sets`` order
    (every source's, primary first, when it is null)."""
    chosen = params.evaluate.sets
    if chosen is None:
        chosen = dict.fromkeys(params.data.all_sources())
    return {
        name: params.evaluate.model_copy(update={"trials": trials or params.evaluate.trials, "sets": None})
        for name, trials in chosen.items()
    }


#: Keys of the flat ``model`` section that moved into its subsections, for the error message of an
#: old ``params.yaml``.
RENAMED_KEYS = {
    "model.aam_margin": "model.aam.margin",
    "model.aam_scale": "model.aam.scale",
    "model.aam_margin_ramp": "model.aam.margin_ramp",
    "model.aam_centres": "model.aam.centres",
    "model.teacher_centre_s": "model.aam.teacher_centre_s",
    "model.distill_crops_per_segment": "model.distill.crops_per_segment",
    "model.distill_aam_weight": "model.distill.aam_weight",
    "model.moe_experts": "model.moe.experts",
    "model.moe_expert_channels": "model.moe.expert_channels",
    "model.moe_gate_channels": "model.moe.gate_channels",
    "model.moe_balance": "model.moe.balance",
    "model.speeds": "model.augment.speeds",
    "model.speed_as_speakers": "model.augment.speed_as_speakers",
}


def _format_errors(source: str, err: ValidationError) -> str:
    """All problems on one line (``key: reason; key: reason``), each naming the allowed values.

    One line because the entry points print it as ``error: ...`` and exit: a typo should read like
    a compiler error, not like a traceback.
    """
    problems = [_describe_error(e) for e in err.errors()]
    return f"{source}: invalid parameters: " + "; ".join(problems)


def _describe_error(e: Mapping[str, Any]) -> str:
    key = ".".join(str(p) for p in e["loc"]) or "<root>"
    kind = e["type"]
    if kind == "extra_forbidden":
        if key in RENAMED_KEYS:
            return f"{key}: unknown key (renamed: {RENAMED_KEYS[key]})"
        section = _section_for(e["loc"][:-1])
        allowed = ", ".join(sorted(section.model_fields)) if section else "?"
        return f"{key}: unknown key (allowed: {allowed})"
    if kind == "value_error":
        # Our own validators' messages already name the key; drop pydantic's "Value error, " prefix.
        return f"{key}: {e.get('ctx', {}).get('error', e['msg'])}"
    if kind == "missing":
        return f"{key}: {e['msg']}"
    if key == "model.augment" and isinstance(e.get("input"), list):  # the flat layout's list of kinds
        return f"{key}: a section now; the list {e['input']!r} belongs in model.augment.kinds"
    return f"{key}: {e['msg']}, got {e.get('input')!r}"


def _section_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate ``params.yaml``; ``overrides`` uses dotted keys (``{"index.type": "hnsw"}``).

    Beyond the schema, paths that must exist are checked here too (``data.path`` of a ``folder``
    or ``voxceleb`` dataset, resolved against the directory holding the file, i.e. the project root), so a wrong
    path fails before any stage starts rather than after earlier stages have rewritten outputs.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        # PyYAML's message spans lines (with a caret under the column): keep it on one.
        detail = " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid YAML: {detail}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    params = params_from_dict(raw, str(path))
    for name, data in params.data.all_sources().items():
        _check_dataset_path(data, path, "data" if name == params.data.primary_name else f"data.sources.{name}")
    for evaluate in eval_sets(params).values():
        check_trials_path(evaluate, path.resolve().parent, path)
    return params


def _check_dataset_path(data: SourceParams, source: Path, key: str = "data") -> None:
    """A ``folder`` or ``voxceleb`` dataset's ``data.path`` must be an existing directory (relative: to the project)."""
    if data.dataset not in PATH_KINDS or not data.path:
        return
    root = source.resolve().parent
    folder = Path(data.path).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    if folder.is_dir():
        return
    reason = "is not a directory" if folder.exists() else "does not exist"
    tree = "<speaker>/<video>/<utterance>" if data.dataset == "voxceleb" else "<speaker>/<utterance>"
    raise ConfigError(
        f"{source}: invalid parameters: {key}.path: {folder} {reason} "
        f"({key}.path={data.path!r}, relative paths are resolved against {root}; "
        f"it must hold {tree}.wav|flac|m4a|mp3|ogg|opus, optionally under train/ and test/)"
    )


def flatten_dotted(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, the inverse of :func:`set_dotted`; other leaves kept as is."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_dotted(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[leaf] = value
