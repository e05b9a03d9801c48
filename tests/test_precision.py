"""Which precision inference and training run in, per device and hardware."""

from __future__ import annotations

import pytest
import torch

from voiceprint.common import precision
from voiceprint.common.precision import autocast_dtype, training_autocast_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_takes_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else None
    assert autocast_dtype(CPU, amp=True) == training_autocast_dtype(CPU, amp=True) == expected
    assert autocast_dtype(CPU, amp=False) is None and training_autocast_dtype(CPU, amp=False) is None


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_inference_falls_back_to_fp16_but_training_to_float32(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert autocast_dtype(CUDA, amp=True) == (torch.bfloat16 if bf16 else torch.float16)
    # fp16 training would need loss scaling: without bf16 it trains in float32.
    assert training_autocast_dtype(CUDA, amp=True) == (torch.bfloat16 if bf16 else None)
    assert training_autocast_dtype(CUDA, amp=False) is None
