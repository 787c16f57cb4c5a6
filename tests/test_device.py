"""`extract.device: auto` follows TransformerLens's picker: CUDA if present, MPS only when opted in."""

import torch

from analysis.extraction.runner import pick_device, pick_dtype


def _machine(monkeypatch, cuda: bool, mps: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps)


def test_auto_prefers_cuda(monkeypatch):
    _machine(monkeypatch, cuda=True, mps=True)
    assert pick_device("auto") == "cuda"


def test_auto_does_not_pick_mps_unless_opted_in(monkeypatch):
    _machine(monkeypatch, cuda=False, mps=True)
    monkeypatch.delenv("TRANSFORMERLENS_ALLOW_MPS", raising=False)
    assert pick_device("auto") == "cpu"
    monkeypatch.setenv("TRANSFORMERLENS_ALLOW_MPS", "1")
    assert pick_device("auto") == "mps"


def test_a_named_device_is_used_as_named(monkeypatch):
    _machine(monkeypatch, cuda=False, mps=False)
    assert pick_device("mps") == "mps"
    assert pick_device("cpu") == "cpu"
    assert pick_dtype("auto", "mps") == torch.bfloat16 and pick_dtype("auto", "cpu") == torch.float32
