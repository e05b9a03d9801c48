"""Acceptance test: our SpeechBrain-layout checkpoints load in SpeechBrain and embed identically.

A randomly initialised ECAPA-TDNN (C=64 to stay fast; the code path does not depend on C) is
written with :func:`save_speechbrain_checkpoint`, then loaded both by ``load_ecapa`` and by
``EncoderClassifier.from_hparams``; real LibriSpeech excerpts must give the same embeddings. The
loader's safety properties (strict architecture check, no pickle execution, no YAML execution)
are checked in tests/reliability/test_safe_loading.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from speechbrain.inference.speaker import EncoderClassifier
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN, Classifier
from speechbrain.nnet.CNN import Conv1d as SpeechBrainConv1d
from speechbrain.processing.features import InputNormalization

from voiceprint.common import audio
from voiceprint.encoders.base import SpeakerEncoder
from voiceprint.encoders.ecapa import (
    CheckpointError,
    EcapaConfig,
    EcapaEncoder,
    load_ecapa,
    read_hyperparams,
    save_speechbrain_checkpoint,
    skip_pointwise_padding,
)

LABELS = ["spk-a", "spk-b", "spk-c"]
MAX_SECONDS = 6.0  # excerpts are cut to keep the test quick; the full files add nothing


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1234)
    cfg = EcapaConfig.from_channels(64)
    model = cfg.build()
    # Non-trivial BatchNorm statistics, so a checkpoint that lost its buffers could not pass.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0.0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    classifier = Classifier(input_size=cfg.lin_neurons, out_neurons=len(LABELS))
    target = tmp_path_factory.mktemp("ckpt") / "ecapa"
    return save_speechbrain_checkpoint(
        target, model.eval(), cfg, classifier=classifier, labels=LABELS, extra_card={"note": "test"}
    )


@pytest.fixture(scope="module")
def waveforms(test_other_files: list[Path]) -> list[torch.Tensor]:
    # Four files from different speakers.
    by_speaker = {f.parent.name: f for f in test_other_files}
    files = [by_speaker[s] for s in sorted(by_speaker)[:4]]
    assert len(files) == 4
    return [torch.from_numpy(audio.load(f, 0.0, MAX_SECONDS)) for f in files]


@pytest.fixture(scope="module")
def speechbrain_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EncoderClassifier:
    savedir = tmp_path_factory.mktemp("sb_savedir")
    return EncoderClassifier.from_hparams(source=str(model_dir), savedir=str(savedir), run_opts={"device": "cpu"})


def test_directory_has_speechbrain_layout(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert names == {
        "hyperparams.yaml",
        "embedding_model.ckpt",
        "mean_var_norm_emb.ckpt",
        "classifier.ckpt",
        "label_encoder.txt",
        "label_encoder.ckpt",
        "model_card.json",
    }
    assert (model_dir / "label_encoder.ckpt").read_bytes() == (model_dir / "label_encoder.txt").read_bytes()
    assert not any(p.name.endswith(".tmp") for p in model_dir.parent.iterdir())  # atomic: no leftovers
    hp = (model_dir / "hyperparams.yaml").read_text()
    for needle in (
        "!new:speechbrain.lobes.features.Fbank",
        "!new:speechbrain.processing.features.InputNormalization",
        "norm_type: sentence",
        "!new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN",
        "!new:speechbrain.utils.parameter_transfer.Pretrainer",
        "        embedding_model: !ref <embedding_model>",
        "        label_encoder: !ref <label_encoder>",
    ):
        assert needle in hp
    # No location: SpeechBrain takes <source>/<loadable>.ckpt from the directory it is handed.
    assert "pretrained_path" not in hp and "\n    paths:" not in hp and str(model_dir) not in hp
    # The embedding-norm stats load through SpeechBrain's own (weights_only) loader.
    norm = InputNormalization(norm_type="global", std_norm=False)
    norm._load(model_dir / "mean_var_norm_emb.ckpt")
    assert norm.glob_mean.shape == (192,)

    card = json.loads((model_dir / "model_card.json").read_text())
    encoder = load_ecapa(model_dir)
    assert card["model_id"] == encoder.model_id
    assert encoder.model_id.startswith("ecapa-c64-") and len(encoder.model_id) == len("ecapa-c64-") + 12
    assert card["num_parameters"] == encoder.num_parameters() > 0
    assert card["note"] == "test" and card["num_classes"] == len(LABELS)


def test_embeddings_match_speechbrain(
    model_dir: Path, speechbrain_model: EncoderClassifier, waveforms: list[torch.Tensor]
) -> None:
    ours = load_ecapa(model_dir)
    assert isinstance(ours, SpeakerEncoder) and isinstance(ours, EcapaEncoder)
    assert ours.dim == 192 and ours.device == torch.device("cpu")

    for wav in waveforms:
        ref = speechbrain_model.encode_batch(wav.unsqueeze(0)).squeeze(1)
        got = ours.embed(wav.unsqueeze(0), torch.ones(1))
        assert got.shape == (1, 192) and got.dtype == torch.float32
        assert torch.isfinite(got).all()
        assert (got - ref).abs().max().item() < 1e-4

    # Padded batch with relative lengths: the masking path must match SpeechBrain's too.
    longest = max(len(w) for w in waveforms)
    batch = torch.zeros(len(waveforms), longest)
    for i, w in enumerate(waveforms):
        batch[i, : len(w)] = w
    lengths = torch.tensor([len(w) / longest for w in waveforms])
    ref = speechbrain_model.encode_batch(batch, lengths).squeeze(1)
    got = ours.embed(batch, lengths)
    assert (got - ref).abs().max().item() < 1e-4

    # Distinct inputs give distinct embeddings (the model is not degenerate).
    assert torch.cdist(got, got).fill_diagonal_(1.0).min() > 1e-3


def test_skipped_pointwise_padding_changes_nothing_but_the_copy(waveforms: list[torch.Tensor]) -> None:
    """``cfg.build()`` turns SpeechBrain's no-op 'same' padding of kernel-1 layers into 'valid':
    outputs and every gradient must equal those of SpeechBrain's stock ECAPA_TDNN with the same
    weights, in training mode (batch statistics) on real speech."""
    cfg = EcapaConfig.from_channels(32)
    torch.manual_seed(7)
    ours = cfg.build().train()
    stock = ECAPA_TDNN(input_size=cfg.n_mels, lin_neurons=cfg.lin_neurons, channels=list(cfg.channels)).train()
    stock.load_state_dict(ours.state_dict(), strict=True)
    switched = [m for m in ours.modules() if isinstance(m, SpeechBrainConv1d) and m.padding == "valid"]
    assert switched and all(m.kernel_size == 1 and m.stride == 1 for m in switched)
    assert all(m.padding == "same" for m in stock.modules() if isinstance(m, SpeechBrainConv1d))
    assert skip_pointwise_padding(ours) == 0  # idempotent: nothing left to switch
    fresh = ECAPA_TDNN(input_size=cfg.n_mels, lin_neurons=cfg.lin_neurons, channels=list(cfg.channels))
    assert skip_pointwise_padding(fresh) == len(switched)

    fbank, norm = cfg.build_fbank(), cfg.build_norm()
    crops = torch.stack([w[: 2 * audio.TARGET_SR] for w in waveforms])
    feats = norm(fbank(crops), torch.ones(len(crops)))
    outputs = [model(feats, torch.ones(len(crops))) for model in (ours, stock)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
    for out in outputs:
        out.square().sum().backward()
    for (name, p_ours), p_stock in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p_ours.grad, p_stock.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_speechbrain_sees_classifier_and_labels(
    speechbrain_model: EncoderClassifier, waveforms: list[torch.Tensor]
) -> None:
    _, _, _, labels = speechbrain_model.classify_batch(waveforms[0].unsqueeze(0))
    assert labels[0] in LABELS


def test_directory_loads_from_any_working_directory_and_after_a_move(
    model_dir: Path, tmp_path: Path, waveforms: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing in the directory names where it was written: SpeechBrain and ``load_ecapa`` load it
    by a relative path from its parent, and a copy elsewhere loads from an unrelated working
    directory, with the same embeddings and labels."""
    moved = tmp_path / "elsewhere" / "a-moved-model"
    shutil.copytree(model_dir, moved)
    wav = waveforms[0].unsqueeze(0)
    reference = load_ecapa(model_dir).embed(wav, torch.ones(1))

    monkeypatch.chdir(moved.parent)
    relative = EncoderClassifier.from_hparams(
        source="a-moved-model", savedir=str(tmp_path / "sb_rel"), run_opts={"device": "cpu"}
    )
    assert (relative.encode_batch(wav).squeeze(1) - reference).abs().max().item() < 1e-4
    assert relative.classify_batch(wav)[3][0] in LABELS
    assert torch.equal(load_ecapa("a-moved-model").embed(wav, torch.ones(1)), reference)

    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    monkeypatch.chdir(unrelated)
    absolute = EncoderClassifier.from_hparams(
        source=str(moved), run_opts={"device": "cpu"}, savedir=str(tmp_path / "sb_abs")
    )
    assert (absolute.encode_batch(wav).squeeze(1) - reference).abs().max().item() < 1e-4
    assert absolute.classify_batch(wav)[3][0] in LABELS


def test_same_model_writes_the_same_bytes_in_any_directory(tmp_path: Path) -> None:
    """models/ecapa is a DVC output: the same weights written in two checkouts must hash the same."""
    torch.manual_seed(5)
    cfg = EcapaConfig.from_channels(16)
    model = cfg.build().eval()
    classifier = Classifier(input_size=cfg.lin_neurons, out_neurons=len(LABELS))
    digests = []
    for target in (tmp_path / "a" / "ecapa", tmp_path / "a-much-longer-checkout-path" / "nested" / "ecapa"):
        written = save_speechbrain_checkpoint(
            target, model, cfg, classifier=classifier, labels=LABELS, extra_card={"note": "test"}
        )
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(written.iterdir())})
    assert digests[0] == digests[1]
    exported = [load_ecapa(tmp_path / "a" / "ecapa").export(tmp_path / f"export{i}" / "x") for i in (1, 22)]
    assert [p.name for p in sorted(exported[0].iterdir())] == [p.name for p in sorted(exported[1].iterdir())]
    for a, b in zip(sorted(exported[0].iterdir()), sorted(exported[1].iterdir())):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_published_layout_still_writable_with_a_pretrained_path(tmp_path: Path) -> None:
    """``pretrained_path`` (a Hub repo id when publishing) writes ``pretrainer.paths`` as the
    published models have them; our loader reads either form."""
    cfg = EcapaConfig.from_channels(16)
    written = save_speechbrain_checkpoint(
        tmp_path / "pub", cfg.build().eval(), cfg, pretrained_path="someone/spkrec-ecapa-test"
    )
    hp = (written / "hyperparams.yaml").read_text()
    assert 'pretrained_path: "someone/spkrec-ecapa-test"' in hp
    assert "embedding_model: !ref <pretrained_path>/embedding_model.ckpt" in hp
    assert read_hyperparams(written / "hyperparams.yaml") == cfg


def test_export_round_trip_keeps_model_id(model_dir: Path, tmp_path: Path, waveforms: list[torch.Tensor]) -> None:
    original = load_ecapa(model_dir)
    exported = original.export(tmp_path / "copy", extra_card={"source": str(model_dir)})
    again = load_ecapa(exported)
    assert again.model_id == original.model_id
    assert (exported / "classifier.ckpt").exists() and (exported / "label_encoder.txt").exists()
    wav = waveforms[0].unsqueeze(0)
    assert torch.equal(again.embed(wav, torch.ones(1)), original.embed(wav, torch.ones(1)))


def test_reads_the_published_voxceleb_hyperparams(tmp_path: Path) -> None:
    # The hyperparams.yaml of speechbrain/spkrec-ecapa-voxceleb (verbatim structure), read offline.
    text = """\
n_mels: 80
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
out_n_neurons: 7205
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [1024, 1024, 1024, 1024, 3072]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: 192
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 192
    out_neurons: !ref <out_n_neurons>
mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""
    path = tmp_path / "hyperparams.yaml"
    path.write_text(text)
    cfg = read_hyperparams(path)
    assert cfg == EcapaConfig()  # EcapaConfig's defaults are exactly this published model
    assert cfg.channels == [1024, 1024, 1024, 1024, 3072] and cfg.n_mels == 80 and cfg.lin_neurons == 192
    assert cfg.sentence_std_norm is False and cfg.fbank == {}


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_ecapa(tmp_path / "nope" / "ecapa")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"hyperparams\.yaml: missing"):
        load_ecapa(tmp_path / "empty")
