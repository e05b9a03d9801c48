"""ECAPA-TDNN speaker encoder stored in SpeechBrain's checkpoint layout.

:func:`save_speechbrain_checkpoint` writes a directory that SpeechBrain's ``EncoderClassifier`` loads
unchanged; :func:`load_ecapa` loads ours or a published one without executing ``hyperparams.yaml``
(safe YAML, ``torch.load(weights_only=True)``) into an :class:`EcapaEncoder`.
Design (the layout, why no HyperPyYAML): docs/design/encoders.md#ecapa-tdnn-in-speechbrains-layout.
"""

from __future__ import annotations

import ast
import json
import logging
import operator
import pickle
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
from speechbrain.nnet.CNN import Conv1d as SpeechBrainConv1d
from speechbrain.processing.features import InputNormalization

from voiceprint.common.atomic import atomic_dir
from voiceprint.common.checksums import sha256_file
from voiceprint.encoders.base import ModuleEncoder

log = logging.getLogger(__name__)

HYPERPARAMS = "hyperparams.yaml"
EMBEDDING_CKPT = "embedding_model.ckpt"
EMB_NORM_CKPT = "mean_var_norm_emb.ckpt"
CLASSIFIER_CKPT = "classifier.ckpt"
LABEL_ENCODER = "label_encoder.txt"
# SpeechBrain's Pretrainer fetches a loadable given no path as ``<source>/<name>.ckpt``; the labels
# are written under that name too, so the hyperparams need no path to find them (see render_hyperparams).
LABEL_ENCODER_SB = "label_encoder.ckpt"
MODEL_CARD = "model_card.json"

_ECAPA_CLASS = "speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN"
_CLASSIFIER_CLASS = "speechbrain.lobes.models.ECAPA_TDNN.Classifier"
_FBANK_CLASS = "speechbrain.lobes.features.Fbank"
_NORM_CLASS = "speechbrain.processing.features.InputNormalization"

# Fbank keyword arguments we honour when reading a hyperparams file (all plain scalars).
_FBANK_OPTIONS = (
    "sample_rate",
    "f_min",
    "f_max",
    "n_fft",
    "win_length",
    "hop_length",
    "filter_shape",
    "param_change_factor",
    "param_rand_factor",
)


class CheckpointError(ValueError):
    """A model directory or file that cannot be used; the message names the file and the reason."""


@dataclass
class EcapaConfig:
    """Architecture and front-end hyperparameters of an ECAPA-TDNN speaker encoder.

    Field names follow ``speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN`` so the config maps 1:1
    onto ``hyperparams.yaml``. ``fbank`` holds Fbank options other than ``n_mels`` that differ from
    SpeechBrain's defaults (empty for every published ECAPA model); ``sentence_std_norm`` mirrors
    ``mean_var_norm.std_norm`` (False in the VoxCeleb recipe: mean normalisation only).
    """

    n_mels: int = 80
    channels: list[int] = field(default_factory=lambda: [1024, 1024, 1024, 1024, 3072])
    kernel_sizes: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 1])
    dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 1])
    attention_channels: int = 128
    lin_neurons: int = 192
    res2net_scale: int = 8
    se_channels: int = 128
    global_context: bool = True
    groups: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1])
    fbank: dict[str, Any] = field(default_factory=dict)
    sentence_std_norm: bool = False

    @classmethod
    def from_channels(cls, channels: int, *, lin_neurons: int = 192, n_mels: int = 80) -> EcapaConfig:
        """The VoxCeleb recipe's shape scaled to ``channels``: ``[C, C, C, C, 3C]``."""
        return cls(n_mels=n_mels, channels=[channels] * 4 + [3 * channels], lin_neurons=lin_neurons)

    @property
    def width(self) -> int:
        """The ``C`` of ``[C, C, C, C, 3C]`` (first block width), used in the model id."""
        return int(self.channels[0])

    def build(self) -> ECAPA_TDNN:
        """A freshly initialised SpeechBrain ``ECAPA_TDNN`` with this architecture (its pointwise
        convolutions spared a no-op copy: :func:`skip_pointwise_padding`)."""
        model = ECAPA_TDNN(
            input_size=self.n_mels,
            lin_neurons=self.lin_neurons,
            channels=list(self.channels),
            kernel_sizes=list(self.kernel_sizes),
            dilations=list(self.dilations),
            attention_channels=self.attention_channels,
            res2net_scale=self.res2net_scale,
            se_channels=self.se_channels,
            global_context=self.global_context,
            groups=list(self.groups),
        )
        skip_pointwise_padding(model)
        return model

    def build_fbank(self) -> Fbank:
        return Fbank(n_mels=self.n_mels, **self.fbank)

    def build_norm(self) -> InputNormalization:
        return InputNormalization(norm_type="sentence", std_norm=self.sentence_std_norm)


def skip_pointwise_padding(model: torch.nn.Module) -> int:
    """Switch SpeechBrain's kernel-1, stride-1 ``Conv1d`` layers from 'same' to 'valid' padding.

    For a kernel of 1, 'same' pads nothing, yet SpeechBrain still calls ``F.pad(x, [0, 0],
    mode="reflect")``: a full copy of the activations forward and another backward, in 16 layers
    of ECAPA-TDNN. 'valid' computes the identical output without it; a C=128 training step on a
    2-core CPU went from 0.349-0.363 s to 0.287-0.296 s. Only the module attribute changes, not
    the state dict or ``hyperparams.yaml``, so the checkpoint is SpeechBrain's as before. Returns
    the number of layers switched.
    """
    switched = 0
    for module in model.modules():
        if (
            isinstance(module, SpeechBrainConv1d)
            and module.padding == "same"
            and module.kernel_size == 1
            and module.stride == 1
        ):
            module.padding = "valid"
            switched += 1
    return switched


# --------------------------------------------------------------------------------------------------
# Encoder


class FbankEncoder(ModuleEncoder):
    """SpeechBrain's ECAPA front end (Fbank, sentence mean normalisation) before any network with
    ECAPA_TDNN's call signature ``model(feats, lengths) -> (B, 1, D)``.

    The front end reproduces ``EncoderClassifier.encode_batch`` step for step (Fbank, sentence mean
    normalisation with relative lengths, ``embedding_model(feats, lengths)``), so embeddings match
    SpeechBrain's own inference to float rounding. Shared by the single ECAPA-TDNN and the mixture
    of ECAPA experts (:mod:`voiceprint.encoders.moe`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Any,
        *,
        weights_sha256: str,
        files: Mapping[str, Path] | None = None,
    ):
        self.cfg = cfg
        self.dim = cfg.lin_neurons
        self.model = model.eval()
        self.fbank = cfg.build_fbank().eval()
        self.norm = cfg.build_norm().eval()
        self.weights_sha256 = weights_sha256
        # Local paths of the files this encoder was loaded from (used to re-export them verbatim).
        self.files: dict[str, Path] = dict(files or {})
        self._device = torch.device("cpu")
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model, self.fbank, self.norm]

    def features(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Fbank + sentence mean normalisation, ``(B, T) -> (B, frames, n_mels)``."""
        feats = self.fbank(wavs)
        return self.norm(feats, lengths)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` waveforms + relative lengths -> ``(B, D)`` float32 on :attr:`device`."""
        with torch.inference_mode():
            if wavs.dim() == 1:
                wavs = wavs.unsqueeze(0)
            wavs = wavs.to(self._device, dtype=torch.float32)
            lengths = lengths.to(self._device, dtype=torch.float32)
            # Features stay in float32 even under an outer autocast: log-mel of low-energy frames
            # loses too much in bf16/fp16.
            with torch.autocast(device_type=self._device.type, enabled=False):
                feats = self.features(wavs, lengths)
            emb = self.model(feats, lengths)
            return emb.squeeze(1).float()


class EcapaEncoder(FbankEncoder):
    """ECAPA-TDNN behind the :class:`SpeakerEncoder` interface (see :class:`FbankEncoder`)."""

    name = "ecapa"
    autocast_safe = True  # features are computed in float32 (see embed); bf16 checked in tests/test_embed.py
    cfg: EcapaConfig

    @property
    def model_id(self) -> str:
        return f"ecapa-c{self.cfg.width}-{self.weights_sha256[:12]}"

    def export(self, model_dir: str | Path, *, extra_card: dict[str, Any] | None = None) -> Path:
        """Write this encoder to ``model_dir`` in SpeechBrain layout, copying checkpoint bytes verbatim.

        Copying (rather than re-serialising) keeps ``embedding_model.ckpt`` byte-identical, hence the
        same :attr:`model_id`. A classifier + label encoder found beside the source are carried over.
        """
        src_emb = self.files.get(EMBEDDING_CKPT)
        if src_emb is None:
            raise CheckpointError("encoder has no source embedding_model.ckpt to export")
        n_classes = None
        src_cls = self.files.get(CLASSIFIER_CKPT)
        if src_cls is not None:
            weight = load_state_dict(src_cls).get("weight")
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != self.dim:
                log.warning("%s: not an ECAPA Classifier for %d-d embeddings; not exported", src_cls, self.dim)
                src_cls = None
            else:
                n_classes = int(weight.shape[0])
        src_lab = self.files.get(LABEL_ENCODER) if src_cls is not None else None
        src_norm = self.files.get(EMB_NORM_CKPT)
        if src_norm is not None and not _valid_emb_norm(src_norm):
            log.warning("%s: unusable embedding-norm statistics; writing identity statistics", src_norm)
            src_norm = None

        def write(tmp: Path) -> None:
            shutil.copyfile(src_emb, tmp / EMBEDDING_CKPT)
            if src_norm is not None:
                shutil.copyfile(src_norm, tmp / EMB_NORM_CKPT)
            else:
                _write_identity_emb_norm(tmp / EMB_NORM_CKPT, self.dim)
            if src_cls is not None:
                shutil.copyfile(src_cls, tmp / CLASSIFIER_CKPT)
            if src_lab is not None:
                shutil.copyfile(src_lab, tmp / LABEL_ENCODER)

        return _write_model_dir(
            model_dir,
            self.cfg,
            write,
            n_classes=n_classes,
            has_labels=src_lab is not None,
            num_parameters=self.num_parameters(),
            extra_card=extra_card,
        )


# --------------------------------------------------------------------------------------------------
# Saving


def save_speechbrain_checkpoint(
    model_dir: str | Path,
    embedding_model: torch.nn.Module,
    cfg: EcapaConfig,
    *,
    classifier: torch.nn.Module | None = None,
    labels: list[str] | None = None,
    extra_card: dict[str, Any] | None = None,
    pretrained_path: str | None = None,
) -> Path:
    """Write ``embedding_model`` (and optionally its AAM classifier) as a SpeechBrain model directory.

    The directory is built under a temporary name and swapped in whole, so a crash never leaves a
    half-written model for the embedding stage to pick up. By default ``hyperparams.yaml`` names no
    path: ``EncoderClassifier.from_hparams(source=DIR)`` finds the checkpoint files in ``DIR``,
    wherever the directory lies and whatever the working directory (and two checkouts write the same
    bytes). ``pretrained_path`` (a Hugging Face repo id when publishing) instead writes
    ``pretrainer.paths`` entries pointing there, as the published SpeechBrain models do.
    ``mean_var_norm_emb.ckpt`` holds identity statistics (zero mean, unit std): SpeechBrain's
    ``encode_batch(normalize=True)`` then equals ``normalize=False`` instead of failing.
    """
    if labels is not None and classifier is None:
        raise ValueError("labels given without a classifier")
    n_classes = None
    if classifier is not None:
        weight = classifier.state_dict().get("weight")
        if weight is None:
            raise ValueError("classifier has no 'weight' parameter (expected ECAPA_TDNN.Classifier)")
        n_classes = int(weight.shape[0])
        if labels is not None and len(labels) != n_classes:
            raise ValueError(f"{len(labels)} labels for a classifier with {n_classes} outputs")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")

    def write(tmp: Path) -> None:
        torch.save(cpu_state_dict(embedding_model), tmp / EMBEDDING_CKPT)
        _write_identity_emb_norm(tmp / EMB_NORM_CKPT, cfg.lin_neurons)
        if classifier is not None:
            torch.save(cpu_state_dict(classifier), tmp / CLASSIFIER_CKPT)
        if labels is not None:
            write_label_encoder(tmp / LABEL_ENCODER, labels)

    return _write_model_dir(
        model_dir,
        cfg,
        write,
        n_classes=n_classes,
        has_labels=labels is not None,
        num_parameters=sum(p.numel() for p in embedding_model.parameters()),
        extra_card=extra_card,
        pretrained_path=pretrained_path,
    )


def _write_model_dir(
    model_dir: str | Path,
    cfg: EcapaConfig,
    write_files: Callable[[Path], None],
    *,
    n_classes: int | None,
    has_labels: bool,
    num_parameters: int,
    extra_card: dict[str, Any] | None,
    pretrained_path: str | None = None,
) -> Path:
    model_dir = Path(model_dir).resolve()
    with atomic_dir(model_dir) as tmp:
        write_files(tmp)
        if has_labels:
            shutil.copyfile(tmp / LABEL_ENCODER, tmp / LABEL_ENCODER_SB)
        (tmp / HYPERPARAMS).write_text(
            render_hyperparams(
                cfg,
                pretrained_path=pretrained_path,
                n_classes=n_classes,
                has_labels=has_labels,
            ),
            encoding="utf-8",
        )
        sha = sha256_file(tmp / EMBEDDING_CKPT)
        write_model_card(
            tmp,
            format="speechbrain",
            architecture="ECAPA_TDNN",
            model_id=f"ecapa-c{cfg.width}-{sha[:12]}",
            sha=sha,
            embedding_dim=cfg.lin_neurons,
            num_parameters=num_parameters,
            num_classes=n_classes,
            config=asdict(cfg),
            extra=extra_card,
        )
    return model_dir


def write_model_card(
    model_dir: Path,
    *,
    format: str,
    architecture: str,
    model_id: str,
    sha: str,
    embedding_dim: int,
    num_parameters: int,
    num_classes: int | None,
    config: dict[str, Any],
    extra: dict[str, Any] | None,
) -> None:
    """``model_card.json``: what produced a model directory, for people and for the model id.

    Written last, so ``files`` lists everything else already in ``model_dir``.
    """
    import speechbrain  # local: only for the version string

    card: dict[str, Any] = {
        "format": format,
        "architecture": architecture,
        "model_id": model_id,
        "embedding_model_sha256": sha,
        "embedding_dim": embedding_dim,
        "num_parameters": int(num_parameters),
        "num_classes": num_classes,
        "config": config,
        "files": sorted(p.name for p in model_dir.iterdir()) + [MODEL_CARD],
        "speechbrain_version": speechbrain.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    card.update(extra or {})
    (model_dir / MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")


def render_hyperparams(
    cfg: EcapaConfig,
    *,
    pretrained_path: str | None = None,
    n_classes: int | None = None,
    has_labels: bool = False,
) -> str:
    """HyperPyYAML text in the shape of ``speechbrain/spkrec-ecapa-voxceleb``'s ``hyperparams.yaml``.

    Without ``pretrained_path`` the pretrainer has no ``paths``: SpeechBrain then fetches every
    loadable as ``<source>/<name>.ckpt``, ``source`` being the directory (or repo id) handed to
    ``from_hparams``, so the text names no location and loads wherever the directory is. With one
    (a repo id, say), ``pretrainer.paths`` point at ``<pretrained_path>/<file>`` as in the published
    models.
    """

    def lst(values: list[int]) -> str:
        return "[" + ", ".join(str(int(v)) for v in values) + "]"

    fbank_extra = [f"    {k}: {json.dumps(v)}" for k, v in sorted(cfg.fbank.items())]
    out = [
        "# ############################################################################",
        "# Model: ECAPA-TDNN speaker embeddings (SpeechBrain layout, written by voiceprint)",
        "# Loadable with speechbrain.inference.speaker.EncoderClassifier.from_hparams",
        "# ############################################################################",
        "",
        "# Feature parameters",
        f"n_mels: {cfg.n_mels}",
        "",
    ]
    if pretrained_path is not None:
        out += [
            "# Where the pretrainer finds the checkpoint files",
            f"pretrained_path: {json.dumps(pretrained_path)}",
            "",
        ]
    if n_classes is not None:
        out += ["# Output parameters", f"out_n_neurons: {n_classes}", ""]
    out += [
        "# Model params",
        "compute_features: !new:speechbrain.lobes.features.Fbank",
        "    n_mels: !ref <n_mels>",
        *fbank_extra,
        "",
        "mean_var_norm: !new:speechbrain.processing.features.InputNormalization",
        "    norm_type: sentence",
        f"    std_norm: {cfg.sentence_std_norm}",
        "",
        "embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN",
        "    input_size: !ref <n_mels>",
        f"    channels: {lst(cfg.channels)}",
        f"    kernel_sizes: {lst(cfg.kernel_sizes)}",
        f"    dilations: {lst(cfg.dilations)}",
        f"    attention_channels: {cfg.attention_channels}",
        f"    lin_neurons: {cfg.lin_neurons}",
        f"    res2net_scale: {cfg.res2net_scale}",
        f"    se_channels: {cfg.se_channels}",
        f"    global_context: {cfg.global_context}",
        f"    groups: {lst(cfg.groups)}",
        "",
    ]
    if n_classes is not None:
        out += [
            "classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier",
            f"    input_size: {cfg.lin_neurons}",
            "    out_neurons: !ref <out_n_neurons>",
            "",
        ]
    out += [
        "mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization",
        "    norm_type: global",
        "    std_norm: False",
        "",
        "modules:",
        "    compute_features: !ref <compute_features>",
        "    mean_var_norm: !ref <mean_var_norm>",
        "    embedding_model: !ref <embedding_model>",
        "    mean_var_norm_emb: !ref <mean_var_norm_emb>",
    ]
    if n_classes is not None:
        out.append("    classifier: !ref <classifier>")
    out.append("")
    if has_labels:
        out += ["label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder", ""]
    loadables = ["embedding_model", "mean_var_norm_emb"]
    paths = [EMBEDDING_CKPT, EMB_NORM_CKPT]
    if n_classes is not None:
        loadables.append("classifier")
        paths.append(CLASSIFIER_CKPT)
    if has_labels:
        loadables.append("label_encoder")
        paths.append(LABEL_ENCODER)
    if pretrained_path is None:
        out += [
            "# No paths: SpeechBrain's Pretrainer takes each loadable from the source given to from_hparams",
            "# (this directory) as <name>.ckpt, so the directory loads wherever it lies.",
        ]
    out += ["pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer", "    loadables:"]
    out += [f"        {name}: !ref <{name}>" for name in loadables]
    if pretrained_path is not None:
        out += ["    paths:"]
        out += [f"        {name}: !ref <pretrained_path>/{fname}" for name, fname in zip(loadables, paths)]
    return "\n".join(out) + "\n"


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy, so checkpoints written on a GPU load anywhere without map_location."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _write_identity_emb_norm(path: Path, dim: int) -> None:
    """Statistics in the format ``InputNormalization._save`` writes (plus the pre-1.0 speaker keys).

    The empty ``spk_dict_*`` entries let SpeechBrain < 1.0 (which reads them) load the file too;
    1.x ignores them.
    """
    stats = {
        "count": 1,
        "glob_mean": torch.zeros(dim),
        "glob_std": torch.ones(dim),
        "spk_dict_mean": {},
        "spk_dict_std": {},
        "spk_dict_count": {},
    }
    torch.save(stats, path)


def _valid_emb_norm(path: Path) -> bool:
    try:
        stats = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return False
    return isinstance(stats, Mapping) and all(k in stats for k in ("count", "glob_mean", "glob_std"))


def write_label_encoder(path: Path, labels: list[str]) -> None:
    """Write labels through SpeechBrain's own CategoricalEncoder (Python-literal text format)."""
    from speechbrain.dataio.encoder import CategoricalEncoder

    enc = CategoricalEncoder()
    enc.update_from_iterable(labels)
    enc.expect_len(len(labels))
    enc.save(path)


# --------------------------------------------------------------------------------------------------
# Loading


def load_ecapa(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> EcapaEncoder:
    """Load an ECAPA encoder from a SpeechBrain-layout directory or a Hugging Face repo id.

    ``hyperparams.yaml`` is read as data (never executed) and ``embedding_model.ckpt`` with
    ``weights_only=True``; the state dict must match the architecture exactly (``strict=True``), so
    a wrong or truncated checkpoint fails here, naming the file, instead of producing random
    embeddings. Hub downloads honour ``HF_HUB_OFFLINE`` and the usual cache.
    """
    files = _locate_files(source, cache_dir)
    cfg = read_hyperparams(files[HYPERPARAMS])
    model = cfg.build()
    emb_path = files[EMBEDDING_CKPT]
    state = load_state_dict(emb_path)
    check_state_dict(
        state,
        model,
        emb_path,
        f"ECAPA_TDNN(channels={cfg.channels}, lin_neurons={cfg.lin_neurons}, n_mels={cfg.n_mels}) from {HYPERPARAMS}",
    )
    model.load_state_dict(state, strict=True)
    encoder = EcapaEncoder(model, cfg, weights_sha256=sha256_file(emb_path), files=files)
    return encoder.to(device)


def _locate_files(source: str | Path, cache_dir: str | Path | None) -> dict[str, Path]:
    """Local paths of the model files: the directory itself, or the HF cache after download."""
    src = Path(source).expanduser()
    if src.is_dir():
        files = {
            name: src / name for name in (HYPERPARAMS, EMBEDDING_CKPT, EMB_NORM_CKPT, CLASSIFIER_CKPT, LABEL_ENCODER)
        }
        for required in (HYPERPARAMS, EMBEDDING_CKPT):
            if not files[required].is_file():
                raise CheckpointError(f"{files[required]}: missing (not a SpeechBrain model directory)")
        return {k: v for k, v in files.items() if v.is_file()}
    text = str(source)
    looks_like_path = isinstance(source, Path) or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_like_path:
        raise CheckpointError(f"{source}: model directory not found")
    return _download_from_hub(text, cache_dir)


def _download_from_hub(repo_id: str, cache_dir: str | Path | None) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def get(filename: str) -> Path:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir))

    files: dict[str, Path] = {}
    for required in (HYPERPARAMS, EMBEDDING_CKPT):
        try:
            files[required] = get(required)
        except Exception as err:  # offline, unknown repo, missing file, network: all fatal here
            raise CheckpointError(
                f"{repo_id}: no local directory of that name, and fetching {required} from the "
                f"Hugging Face Hub failed ({type(err).__name__}: {err})"
            ) from None
    try:
        files[EMB_NORM_CKPT] = get(EMB_NORM_CKPT)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        pass  # optional: identity statistics are written on export
    return files


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` restricted to tensors and containers; anything else is refused, not run."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file is not a plain tensor state_dict and may contain "
            f"code (torch.load weights_only=True rejected it: {first})"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path}: expected a state_dict (mapping of parameter name to tensor)")
    return dict(obj)


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module, path: Path, expected_as: str) -> None:
    """Explain a mismatch in one line instead of load_state_dict's wall of keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:3]))
    if missing:
        parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:5]))
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:5]))
    raise CheckpointError(f"{path}: state_dict does not match {expected_as}: " + " | ".join(parts))


# --------------------------------------------------------------------------------------------------
# Inert HyperPyYAML parsing


@dataclass(frozen=True)
class _Tagged:
    """A HyperPyYAML tag kept as data: ``!new:pkg.Class {kwargs}`` -> Tagged("!new:pkg.Class", {...})."""

    tag: str
    value: Any


class _InertLoader(yaml.SafeLoader):
    """SafeLoader that accepts HyperPyYAML's tags without importing or calling anything."""


def _construct_inert(loader: yaml.SafeLoader, node: yaml.Node, tag: str) -> _Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return _Tagged(tag, value)


for _prefix in ("!new:", "!name:", "!apply:", "!module:", "!include:"):
    _InertLoader.add_multi_constructor(
        _prefix, lambda loader, suffix, node, _p=_prefix: _construct_inert(loader, node, _p + suffix)
    )
for _tag in ("!ref", "!copy", "!tuple", "!applyref", "!PLACEHOLDER"):
    _InertLoader.add_constructor(_tag, lambda loader, node, _t=_tag: _construct_inert(loader, node, _t))


def read_hyperparams(path: str | Path) -> EcapaConfig:
    """Extract the ECAPA/Fbank hyperparameters from a SpeechBrain ``hyperparams.yaml`` without running it."""
    path = Path(path)
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_InertLoader)  # noqa: S506 (restricted loader)
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: cannot parse as (inert) HyperPyYAML: {err}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    refs = _RefResolver(tree, path)

    emb = refs.module(tree.get("embedding_model"), "embedding_model", _ECAPA_CLASS)
    kw = emb.value if isinstance(emb.value, dict) else {}
    kw = {k: refs.resolve(v) for k, v in kw.items()}
    activation = kw.pop("activation", None)
    if activation is not None and not (
        isinstance(activation, _Tagged) and activation.tag in ("!name:torch.nn.ReLU", "!new:torch.nn.ReLU")
    ):
        raise CheckpointError(f"{path}: unsupported embedding_model.activation {activation!r} (only ReLU)")
    if "input_size" not in kw:
        raise CheckpointError(f"{path}: embedding_model has no input_size")
    defaults = EcapaConfig(channels=[512, 512, 512, 512, 1536])  # ECAPA_TDNN's own defaults
    try:
        cfg = EcapaConfig(
            n_mels=int(kw["input_size"]),
            channels=_int_list(kw.get("channels", defaults.channels)),
            kernel_sizes=_int_list(kw.get("kernel_sizes", defaults.kernel_sizes)),
            dilations=_int_list(kw.get("dilations", defaults.dilations)),
            attention_channels=int(kw.get("attention_channels", defaults.attention_channels)),
            lin_neurons=int(kw.get("lin_neurons", defaults.lin_neurons)),
            res2net_scale=int(kw.get("res2net_scale", defaults.res2net_scale)),
            se_channels=int(kw.get("se_channels", defaults.se_channels)),
            global_context=bool(kw.get("global_context", defaults.global_context)),
            groups=_int_list(kw.get("groups", [1] * len(_int_list(kw.get("channels", defaults.channels))))),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid embedding_model hyperparameters ({err})") from None
    if not (len(cfg.channels) == len(cfg.kernel_sizes) == len(cfg.dilations) == len(cfg.groups)):
        raise CheckpointError(f"{path}: channels/kernel_sizes/dilations/groups lengths differ")

    feats = refs.module(tree.get("compute_features"), "compute_features", _FBANK_CLASS)
    fkw = {k: refs.resolve(v) for k, v in (feats.value or {}).items()} if isinstance(feats.value, dict) else {}
    n_mels = int(fkw.get("n_mels", 40))  # Fbank's own default
    if n_mels != cfg.n_mels:
        raise CheckpointError(f"{path}: compute_features.n_mels={n_mels} but embedding_model.input_size={cfg.n_mels}")
    if fkw.get("deltas") or fkw.get("context"):
        raise CheckpointError(f"{path}: Fbank deltas/context are not supported")
    cfg.fbank = {k: fkw[k] for k in _FBANK_OPTIONS if k in fkw and isinstance(fkw[k], (int, float, str))}
    if int(cfg.fbank.get("sample_rate", 16000)) != 16000:
        raise CheckpointError(f"{path}: Fbank sample_rate {cfg.fbank['sample_rate']} (16000 required)")

    norm = refs.module(tree.get("mean_var_norm"), "mean_var_norm", _NORM_CLASS)
    nkw = {k: refs.resolve(v) for k, v in norm.value.items()} if isinstance(norm.value, dict) else {}
    if nkw.get("norm_type", "global") != "sentence":
        raise CheckpointError(
            f"{path}: mean_var_norm.norm_type={nkw.get('norm_type', 'global')!r}; only 'sentence' is supported"
        )
    cfg.sentence_std_norm = bool(nkw.get("std_norm", True))
    return cfg


def _int_list(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of integers, got {value!r}")
    return [int(v) for v in value]


class _RefResolver:
    """Resolves ``!ref <key>`` / ``<a[b]>`` interpolation and simple arithmetic, like HyperPyYAML."""

    _REF = re.compile(r"<([^<>]*)>")
    _OPS: dict[type, Callable[[Any, Any], Any]] = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod,
    }

    def __init__(self, tree: dict[str, Any], path: Path):
        self.tree = tree
        self.path = path

    def module(self, node: Any, key: str, expected_class: str) -> _Tagged:
        node = self.resolve(node)
        if node is None:
            raise CheckpointError(f"{self.path}: no '{key}' entry")
        if not isinstance(node, _Tagged) or node.tag != f"!new:{expected_class}":
            tag = node.tag if isinstance(node, _Tagged) else type(node).__name__
            raise CheckpointError(f"{self.path}: '{key}' is {tag}, expected !new:{expected_class}")
        return node

    def resolve(self, value: Any, depth: int = 0) -> Any:
        if depth > 20:
            raise CheckpointError(f"{self.path}: !ref chain too deep (circular reference?)")
        if isinstance(value, _Tagged) and value.tag in ("!ref", "!copy"):
            return self.resolve(self._interpolate(str(value.value), depth), depth + 1)
        if isinstance(value, _Tagged) and value.tag == "!tuple":
            return value.value
        if isinstance(value, list):
            return [self.resolve(v, depth + 1) for v in value]
        return value

    def _interpolate(self, text: str, depth: int) -> Any:
        whole = self._REF.fullmatch(text.strip())
        if whole:
            return self._lookup(whole.group(1), depth)
        substituted = self._REF.sub(lambda m: str(self._lookup(m.group(1), depth)), text)
        try:
            return self._arith(ast.parse(substituted, mode="eval").body)
        except (SyntaxError, TypeError, ValueError, ZeroDivisionError):
            return substituted

    def _lookup(self, ref: str, depth: int) -> Any:
        parts = re.split(r"[\[\]]+", ref.strip())
        node: Any = self.tree
        for part in (p for p in parts if p):
            if isinstance(node, _Tagged):
                node = node.value
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"{self.path}: unresolvable reference <{ref}>")
            node = node[part]
        return self.resolve(node, depth + 1)

    def _arith(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in self._OPS:
            return self._OPS[type(node.op)](self._arith(node.left), self._arith(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._arith(node.operand)
        raise TypeError("not arithmetic")
