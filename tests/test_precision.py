"""`train.bf16: auto`: bf16 only where the CPU computes it natively, decided from the CPU's answers
(given here, so both decisions run on any host), logged, written resolved into config.yaml, followed
by the run's consumers, and reported when a resumed run changes it."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import yaml

import alignment.precision as precision
from align.cli import build_config
from alignment.precision import CPUFeatures, native_bf16, resolve_bf16
from tests.support.recipes import toy_recipe

ZEN3 = CPUFeatures(frozenset({"avx", "avx2", "fma"}), onednn_bf16=False, capability="AVX2")
SKYLAKE = CPUFeatures(frozenset({"avx2", "avx512f", "avx512bw"}), onednn_bf16=True, capability="AVX512")
ZEN4 = CPUFeatures(frozenset({"avx2", "avx512f", "avx512_bf16"}), onednn_bf16=True, capability="AVX512")
SAPPHIRE = CPUFeatures(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), onednn_bf16=True,
                       capability="AVX512")
ZEN4_LIMITED = CPUFeatures(ZEN4.flags, onednn_bf16=False, capability="AVX2")  # ONEDNN_MAX_CPU_ISA=AVX2
GRAVITON3 = CPUFeatures(frozenset({"asimd", "sve", "bf16"}), onednn_bf16=True, capability="SVE256")


@pytest.mark.parametrize("features, native", [
    (ZEN3, False), (SKYLAKE, False), (ZEN4_LIMITED, False), (ZEN4, True), (SAPPHIRE, True), (GRAVITON3, True),
    (CPUFeatures(None, onednn_bf16=True, capability="AVX512"), True),  # no /proc/cpuinfo: oneDNN decides
])
def test_bf16_is_native_only_with_bf16_units_that_onednn_uses(features, native):
    assert native_bf16("cpu", features)[0] is native


def test_auto_resolves_and_says_why(caplog):
    fp32, bf16 = resolve_bf16("auto", "cpu", ZEN3), resolve_bf16("auto", "cpu", ZEN4)
    assert (fp32.bf16, bf16.bf16, fp32.warning, bf16.warning) == (False, True, None, None)
    with caplog.at_level(logging.INFO, logger="alignment"):
        fp32.log()
        bf16.log()
    assert "precision: fp32 (train.bf16: auto; this CPU has no bf16 units: AVX2; bf16 would be ~5x slower here)" \
        in caplog.text
    assert "precision: bf16 (train.bf16: auto; this CPU has bf16 units: avx512_bf16)" in caplog.text


def test_explicit_bf16_on_a_cpu_without_bf16_units_runs_with_a_warning(caplog):
    explicit = resolve_bf16(True, "cpu", ZEN3)
    assert explicit.bf16 is True and resolve_bf16(False, "cpu", ZEN4).bf16 is False
    with caplog.at_level(logging.INFO, logger="alignment"):
        explicit.log()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["train.bf16=true but this CPU has no bf16 units: AVX2: bf16 is emulated and runs ~5x slower "
                        "than fp32 here (train.bf16: auto or false picks fp32)"]


def test_this_hosts_answer_is_read():
    features = precision.cpu_features()
    assert features.onednn_bf16 == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert set(features.summary()) == {"avx2", "avx512", "avx512_bf16", "amx", "onednn_bf16", "aten_capability"}


@pytest.mark.parametrize("features", [ZEN3, ZEN4], ids=["avx2-only", "avx512-bf16"])
def test_a_run_follows_the_resolved_precision_and_records_it(tmp_path, tiny_model, monkeypatch, features):
    monkeypatch.setattr(precision, "cpu_features", lambda: features)
    native = features is ZEN4
    recipe = toy_recipe(tmp_path, tiny_model, train={"max_steps": 1, "bf16": "auto"})
    trainer_cls, cfg = build_config(str(recipe), [])
    assert cfg.train.bf16 == "auto"
    trainer = trainer_cls(cfg)
    # every consumer reads the resolved bool: the policy's autocast, the engine's decode copy
    assert trainer.cfg.train.bf16 is native and trainer.policy.bf16 is native
    decoder_dtype = next(trainer.engine.decoder.parameters()).dtype
    assert decoder_dtype == (torch.bfloat16 if native else torch.float32)
    assert (trainer.engine.decoder is trainer.engine.model) is not native
    trainer.train()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["bf16"] is native


def test_a_resume_on_another_cpu_kind_says_the_precision_changed(tmp_path, tiny_model, monkeypatch, caplog):
    recipe = toy_recipe(tmp_path, tiny_model, train={"max_steps": 1, "bf16": "auto"})
    monkeypatch.setattr(precision, "cpu_features", lambda: ZEN4)
    trainer_cls, cfg = build_config(str(recipe), [])
    trainer_cls(cfg).train()
    shutil.rmtree(tmp_path / "run" / "final")
    monkeypatch.setattr(precision, "cpu_features", lambda: ZEN3)
    trainer_cls, cfg = build_config(str(recipe), ["resume=true", "train.max_steps=2"])
    with caplog.at_level(logging.INFO, logger="alignment"):
        trainer_cls(cfg).train()
    assert ("resume: the checkpoint was trained in bf16, this run continues in fp32 (train.bf16: auto; this CPU has "
            "no bf16 units: AVX2; bf16 would be ~5x slower here)") in caplog.text
    assert "precision: fp32 (train.bf16: auto; this CPU has no bf16 units" in caplog.text
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["bf16"] is False
