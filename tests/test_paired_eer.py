"""benchmarks/paired_eer.py on two synthetic runs of one eval split: a worse copy is resolved as worse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.paired_eer import main
from tests.test_evaluate import write_speakers
from voiceprint.common.layout import Layout
from voiceprint.common.schema import l2_normalise


def test_paired_eer_resolves_a_worse_run_and_marks_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    centres = l2_normalise(rng.normal(size=(12, 24)))
    offsets = rng.normal(size=(12, 8, 24))
    good = [l2_normalise(c + 0.25 * o) for c, o in zip(centres, offsets, strict=True)]
    bad = [l2_normalise(c + 0.6 * o) for c, o in zip(centres, offsets, strict=True)]  # same utterances, noisier
    for name, vectors in (("good", good), ("bad", bad), ("same", good)):
        write_speakers(Layout.at(tmp_path / name), vectors, n_train=2)
    assert main([str(tmp_path / "good"), str(tmp_path / "bad"), str(tmp_path / "same"), "--replicates", "300"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = {line.split()[0]: line for line in out[1:-1]}
    assert lines[str(tmp_path / "good")].endswith("reference")
    low, high = (float(v) for v in lines[str(tmp_path / "bad")].split("(")[1].rstrip(")").split(" to "))
    assert 0.0 < low < high  # worse on nearly every resample of the ten eval speakers
    assert "+0.00 (+0.00 to +0.00)" in lines[str(tmp_path / "same")]
    # Last line: the mean EER of the three runs, inside its own interval, between the runs' EERs.
    eers = [float(lines[str(tmp_path / n)].split()[1]) for n in ("good", "bad", "same")]
    mean_line = out[-1].split()
    assert out[-1].startswith("mean of the 3 runs")
    mean, (low, high) = float(mean_line[5]), (float(v) for v in mean_line[6].split("-"))
    assert mean == pytest.approx(sum(eers) / 3, abs=0.01)
    assert low < mean < high and min(eers) < mean < max(eers)


def test_paired_eer_needs_embeddings(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "b")])
