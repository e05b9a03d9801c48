"""Typed view of ``params.yaml``.

Every stage reads its parameters through :func:`load_params` so that a typo or a wrong type is
reported *before* any work starts, naming the key and the allowed values (pydantic with
``extra="forbid"``), instead of surfacing as a KeyError twenty minutes into a run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A parameter file that cannot be used; the message names the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DatasetKind = Literal["librispeech-excerpts", "librispeech", "folder"]


class DataParams(_Section):
    dataset: DatasetKind = "librispeech-excerpts"
    # Local mirror searched before the network; relative paths are resolved against the project root.
    mirror: str | None = "../shared/datasets"
    # `folder` datasets: a <speaker>/<utterance>.{wav,flac} tree, optionally split into train/ and test/.
    path: str | None = None
    # `librispeech` (and excerpts): which subsets train the model and which are evaluated.
    train_subset: str | None = "train-clean-100"
    eval_subset: str = "test-other"
    url_base: str = "https://www.openslr.org/resources/12"
    # Caps for quick runs: keep the first N speakers / utterances per speaker (sorted by id).
    max_speakers: int | None = Field(default=None, ge=1)
    max_utterances_per_speaker: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _folder_needs_path(self) -> "DataParams":
        if self.dataset == "folder" and not self.path:
            raise ValueError("data.path is required when data.dataset is 'folder'")
        return self


class VadParams(_Section):
    method: Literal["silero", "energy"] = "silero"
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_speech_s: float = Field(default=0.25, ge=0.0)
    min_silence_s: float = Field(default=0.1, ge=0.0)
    max_segment_s: float = Field(default=10.0, gt=0.0)
    min_segment_s: float = Field(default=0.5, ge=0.0)
    pad_s: float = Field(default=0.03, ge=0.0)


class ModelParams(_Section):
    init: Literal["scratch", "pretrained", "distill"] = "scratch"
    # ecapa: one ECAPA-TDNN of `channels`. moe: a CNN gate mixing `moe_experts` ECAPA-TDNNs of
    # `moe_expert_channels` each (voiceprint.encoders.moe); trained by scratch or distill. The
    # defaults (4 x C=40 + gate: 0.77 M parameters) match the default single ECAPA (C=128: 0.76 M).
    arch: Literal["ecapa", "moe"] = "ecapa"
    # Hugging Face repo id or local directory in SpeechBrain's layout (used when init=pretrained).
    source: str = "speechbrain/spkrec-ecapa-voxceleb"
    channels: int = Field(default=128, ge=8)
    lin_neurons: int = Field(default=192, ge=8)
    n_mels: int = Field(default=80, ge=8)
    steps: int = Field(default=1000, ge=0)
    # init=pretrained: AAM-softmax steps adapting model.source to this dataset's train split (0: use
    # it as is). Uses lr, batch_size, crop_s, augment, aam_* like scratch training.
    finetune_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=32, ge=1)
    crop_s: float = Field(default=2.0, gt=0.0)
    lr: float = Field(default=0.002, gt=0.0)
    weight_decay: float = Field(default=2e-5, ge=0.0)
    aam_margin: float = Field(default=0.3, ge=0.0)
    aam_scale: float = Field(default=30.0, gt=0.0)
    # AAM margin schedule, as WeSpeaker's margin scheduler: margin 0 until the first fraction of the
    # steps, rising linearly to aam_margin at the second; [0, 0]: the full margin from the first step.
    aam_margin_ramp: tuple[float, float] = (0.1, 0.4)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast for the encoder's forward where the hardware runs it natively (CUDA with bf16,
    # CPUs with AVX512-BF16 / AMX; voiceprint.precision); the AAM cosines stay float32.
    amp: bool = True
    # Training augmentation (voiceprint.augment): coloured noise + gain, noise cut from the non-speech
    # parts of the training files, synthetic reverberation, speed perturbation (model.speeds).
    augment: list[Literal["noise", "nonspeech", "reverb", "speed", "specaug"]] = Field(
        default_factory=lambda: ["noise", "nonspeech", "reverb", "speed"]
    )
    # WeSpeaker's recipe: a crop played at another speed counts as another speaker in AAM-softmax
    # (len(speeds) x the classes). Acts where AAM trains on speed-perturbed crops (scratch and
    # fine-tuning, with `speed` in augment); distillation never speed-perturbs: there it does nothing.
    speed_as_speakers: bool = True
    # The speeds `speed` plays crops at (1.0 included; sorted). With speed_as_speakers each other
    # speed is one more block of pseudo-speakers, and with teacher centres one more teacher pass.
    # Five speeds beat Kaldi's three (0.9/1.0/1.1) with teacher centres; see docs/training.md.
    speeds: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2)
    # AAM-softmax class centres: 'teacher' fixes each at the bundled CAM++'s embedding of that class's
    # speech (voiceprint.teacher_centres: the student inherits the teacher's map of which voices are
    # alike); 'learned' trains them, as plain AAM-softmax does. Scratch and fine-tuning.
    aam_centres: Literal["teacher", "learned"] = "teacher"
    # aam_centres=teacher: seconds of each speaker's training speech (per speed) the teacher embeds.
    teacher_centre_s: float = Field(default=4.0, gt=0.0)
    # Average the weights over this last fraction of the steps (a snapshot every 10 steps; WeSpeaker's
    # model averaging) and save the average; 0: save the last step's weights. Scratch and fine-tuning.
    average_last: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Shift the trained ECAPA-TDNN's final bias so its embeddings of the training segments have mean
    # zero (voiceprint.centring: WeSpeaker's mean subtraction, folded into the checkpoint). Scratch
    # and fine-tuning; a mixture of experts is left as trained.
    centre_embeddings: bool = True
    # After centring, fold within-class covariance normalisation into the same final layer
    # (voiceprint.centring): W = (S_w + wccn * I)^(-1/2) of the training segments' within-speaker
    # scatter (mean eigenvalue 1), so the value is a relative regulariser; null: no WCCN. Needs
    # centre_embeddings.
    wccn: float | None = Field(default=None, ge=0.0)
    # init=distill: fixed crops per train segment whose CAM++ (teacher) embeddings are cached, and
    # the weight of the AAM-softmax speaker loss added to the student-teacher cosine loss (0: none).
    distill_crops_per_segment: int = Field(default=4, ge=1)
    distill_aam_weight: float = Field(default=0.0, ge=0.0)
    # arch=moe: experts, their width C, the gate's conv width, and the weight of the load-balancing
    # loss that keeps the batch-average gate from collapsing onto one expert.
    moe_experts: int = Field(default=4, ge=2)
    moe_expert_channels: int = Field(default=40, ge=8)
    moe_gate_channels: int = Field(default=64, ge=4)
    moe_balance: float = Field(default=0.01, ge=0.0)
    # Operational: they never change the trained weights (so they are left out of the model card and
    # of the resume key). Snapshot the training state to data/train_state/ every N steps and resume
    # from it after a kill (0: never); log loss/accuracy/lr to MLflow every N steps (0: summary only);
    # register the result in the MLflow model registry as a pyfunc (voiceprint-ecapa).
    checkpoint_every: int = Field(default=100, ge=0)
    log_every: int = Field(default=10, ge=0)
    register_model: bool = True

    @model_validator(mode="after")
    def _margin_ramp_is_ordered(self) -> "ModelParams":
        start, end = self.aam_margin_ramp
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"model.aam_margin_ramp {list(self.aam_margin_ramp)} must be [start, end] fractions of the "
                "steps with 0 <= start <= end <= 1"
            )
        return self

    @model_validator(mode="after")
    def _speeds_are_usable(self) -> "ModelParams":
        speeds = self.speeds
        if 1.0 not in speeds or list(speeds) != sorted(set(speeds)) or not all(0.5 <= v <= 2.0 for v in speeds):
            raise ValueError(
                f"model.speeds {list(speeds)} must be distinct, sorted, between 0.5 and 2.0, and include 1.0 "
                "(the unperturbed crop)"
            )
        return self

    @model_validator(mode="after")
    def _wccn_follows_centring(self) -> "ModelParams":
        if self.wccn is not None and not self.centre_embeddings:
            raise ValueError("model.wccn needs model.centre_embeddings: true (it whitens the centred embeddings)")
        return self

    @property
    def speed_pseudo_speakers(self) -> bool:
        """Whether speed-perturbed crops really train as other speakers: ``speed_as_speakers`` acts
        only where ``speed`` perturbs the crops."""
        return self.speed_as_speakers and "speed" in self.augment

    @model_validator(mode="after")
    def _moe_is_trained_here(self) -> "ModelParams":
        if self.arch == "moe" and self.init == "pretrained":
            raise ValueError(
                "model.arch 'moe' needs model.init 'scratch' or 'distill': the experts are trained here "
                "(a pretrained SpeechBrain checkpoint is a single ECAPA-TDNN; use arch 'ecapa' for it)"
            )
        return self


class EmbedParams(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Length-bucketed batches are capped by total audio seconds rather than item count.
    max_batch_s: float = Field(default=120.0, gt=0.0)
    amp: bool = True
    # CPU: length-bucketed batches (true) or one segment per call (false); auto: batches below 10 M
    # parameters (measured: small models gain from batching on CPU, large ones lose).
    cpu_batching: Literal["auto"] | bool = "auto"
    # The utterance embedding: one encoder pass over the whole file (file), or the mean of its VAD
    # segments' embeddings (segments). Files longer than utterance_chunk_s are embedded in equal chunks.
    utterance: Literal["file", "segments"] = "file"
    utterance_chunk_s: float = Field(default=60.0, gt=0.0)


class IndexParams(_Section):
    type: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = Field(default=64, ge=1)
    nprobe: int = Field(default=8, ge=1)
    hnsw_m: int = Field(default=32, ge=2)
    ef_search: int = Field(default=128, ge=1)
    ef_construction: int = Field(default=200, ge=1)
    use_gpu: Literal["auto", "never"] = "auto"


class EvaluateParams(_Section):
    enroll_per_speaker: int = Field(default=3, ge=1)
    # Add the training speakers to the identification gallery as distractors.
    train_distractors: bool = True
    p_targets: list[float] = Field(default_factory=lambda: [0.01, 0.05])
    c_miss: float = 1.0
    c_fa: float = 1.0
    seed: int = 0
    # Adaptive s-norm (AS-norm), reported beside the raw cosine scores: impostor cohort = the
    # train-split utterances, top-K cohort scores per side of a trial; 0: not computed.
    snorm_top_k: int = Field(default=100, ge=0)
    # Speaker-level bootstrap intervals of eer / eer_snorm / top1 (voiceprint.bootstrap): replicates
    # (0: off) and the interval's coverage.
    bootstrap: int = Field(default=1000, ge=0)
    bootstrap_level: float = Field(default=0.95, gt=0.0, lt=1.0)


class CompareParams(_Section):
    # name -> encoder spec (voiceprint.encoders.registry): ecapa | campplus | ge2e | speechbrain:DIR | onnx:FILE.
    # Names become DVC stage items (compare-encoder@NAME) and folders (data/compare/NAME).
    encoders: dict[str, str] = Field(
        default_factory=lambda: {"ecapa": "ecapa", "campplus": "campplus", "ge2e": "ge2e"}, min_length=1
    )
    umap_neighbors: int = Field(default=15, ge=2)
    seed: int = 0

    @model_validator(mode="after")
    def _names_are_slugs(self) -> "CompareParams":
        bad = [n for n in self.encoders if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n)]
        if bad:
            raise ValueError(f"compare.encoders names must be letters, digits, '_', '.', '-': {bad}")
        return self


class Params(_Section):
    data: DataParams = Field(default_factory=DataParams)
    vad: VadParams = Field(default_factory=VadParams)
    model: ModelParams = Field(default_factory=ModelParams)
    embed: EmbedParams = Field(default_factory=EmbedParams)
    index: IndexParams = Field(default_factory=IndexParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    compare: CompareParams = Field(default_factory=CompareParams)


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
        section = _section_for(e["loc"][:-1])
        allowed = ", ".join(sorted(section.model_fields)) if section else "?"
        return f"{key}: unknown key (allowed: {allowed})"
    if kind == "value_error":
        # Our own validators' messages already name the key; drop pydantic's "Value error, " prefix.
        return f"{key}: {e.get('ctx', {}).get('error', e['msg'])}"
    if kind == "missing":
        return f"{key}: {e['msg']}"
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
    dataset, resolved against the directory holding the file, i.e. the project root), so a wrong
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
    _check_dataset_path(params.data, path)
    return params


def _check_dataset_path(data: DataParams, source: Path) -> None:
    """A ``folder`` dataset's ``data.path`` must be an existing directory (relative: to the project)."""
    if data.dataset != "folder" or not data.path:
        return
    root = source.resolve().parent
    folder = Path(data.path).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    if folder.is_dir():
        return
    reason = "is not a directory" if folder.exists() else "does not exist"
    raise ConfigError(
        f"{source}: invalid parameters: data.path: {folder} {reason} "
        f"(data.path={data.path!r}, relative paths are resolved against {root}; "
        "it must hold <speaker>/<utterance>.wav|flac, optionally under train/ and test/)"
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
