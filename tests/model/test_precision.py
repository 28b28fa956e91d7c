"""Which precision a run picks: the decision with the CPU capability stubbed both ways, and its record."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scfm.errors import ScfmError
from scfm.model.precision import BF16_MIN_ENCODER_DIM, choose_precision, cpuinfo_has_native_bf16, min_row_cosine
from scfm.tasks.embed import decide_precision

ZEN3_FLAGS = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni\n"
ZEN4_FLAGS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS_FLAGS = "flags\t\t: avx512f avx512bw amx_tile amx_bf16 amx_int8\n"
NEOVERSE_V1_FEATURES = "Features\t: fp asimd sve bf16 i8mm\n"


def never_called():
    raise AssertionError("this probe should not be needed for this decision")


def test_cpuinfo_flags_tell_native_bf16_apart_from_plain_avx512():
    assert not cpuinfo_has_native_bf16(ZEN3_FLAGS)
    assert not cpuinfo_has_native_bf16("flags\t\t: avx512f avx512bw avx512vl avx512dq\n")  # bf16 only emulated
    assert cpuinfo_has_native_bf16(ZEN4_FLAGS)
    assert cpuinfo_has_native_bf16(SAPPHIRE_RAPIDS_FLAGS)
    assert cpuinfo_has_native_bf16(NEOVERSE_V1_FEATURES)


def test_auto_on_a_cpu_without_native_bf16_is_fp32_without_measuring():
    choice = choose_precision("auto", "cpu", native_bf16=lambda: False, bf16_cosine=never_called)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and choice.warning is None


def test_auto_on_a_cpu_with_native_bf16_follows_the_measured_cosine():
    kept = choose_precision("auto", "cpu", native_bf16=lambda: True, bf16_cosine=lambda: 0.99995)
    assert kept.precision == "bf16" and "0.99995" in kept.reason
    spoiled = choose_precision("auto", "cpu", native_bf16=lambda: True, bf16_cosine=lambda: 0.998)
    assert spoiled.precision == "fp32" and "0.998" in spoiled.reason


def test_auto_keeps_fp32_for_an_encoder_too_narrow_for_bf16_to_pay():
    narrow = choose_precision("auto", "cpu", native_bf16=lambda: True, bf16_cosine=never_called,
                              encoder_dim=BF16_MIN_ENCODER_DIM // 2)
    assert narrow.precision == "fp32" and f"{BF16_MIN_ENCODER_DIM // 2}-d encoder" in narrow.reason
    wide = choose_precision("auto", "cpu", native_bf16=lambda: True, bf16_cosine=lambda: 0.99995,
                            encoder_dim=BF16_MIN_ENCODER_DIM)
    assert wide.precision == "bf16"
    # the rule is about speed on a CPU: an explicit request and CUDA are untouched
    assert choose_precision("bf16", "cpu", native_bf16=lambda: True, encoder_dim=64).precision == "bf16"
    assert choose_precision("auto", "cuda", native_bf16=never_called, encoder_dim=64).precision == "bf16"


def test_explicit_bf16_warns_only_when_the_cpu_emulates_it():
    emulated = choose_precision("bf16", "cpu", native_bf16=lambda: False, bf16_cosine=never_called)
    assert emulated.precision == "bf16" and "slower than fp32" in emulated.warning
    assert "\n" not in emulated.warning
    native = choose_precision("bf16", "cpu", native_bf16=lambda: True, bf16_cosine=never_called)
    assert native.precision == "bf16" and native.warning is None


def test_cuda_auto_stays_bf16_and_fp32_is_always_honoured():
    assert choose_precision("auto", "cuda", native_bf16=never_called, bf16_cosine=never_called).precision == "bf16"
    assert choose_precision("fp32", "cpu", native_bf16=never_called, bf16_cosine=never_called).precision == "fp32"
    with pytest.raises(ScfmError, match="unknown precision"):
        choose_precision("fp16", "cpu", native_bf16=lambda: True)


def test_min_row_cosine_is_the_worst_cell():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert min_row_cosine(a, b) == pytest.approx(np.sqrt(0.5))
    assert min_row_cosine(a[:1], b[:1]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_model_and_cells():
    from scfm.model import ModelConfig, XTrimoGene

    # as wide as an encoder gets before the width rule keeps fp32, so that the cosine check runs
    config = ModelConfig.preset("tiny", n_genes=300).replace(encoder_dim=BF16_MIN_ENCODER_DIM)
    model = XTrimoGene(config, seed=0).eval()
    rng = np.random.default_rng(0)
    cells = sp.random(20, 300, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    cells.data = np.ceil(cells.data * 10).astype(np.float32)
    return model, cells


def test_decide_precision_measures_the_real_model_when_the_cpu_has_native_bf16(tiny_model_and_cells):
    model, cells = tiny_model_and_cells
    native = decide_precision(model, cells, "auto", "cpu", native_bf16=lambda: True)
    assert native.precision in ("bf16", "fp32") and "min per-cell cosine to fp32" in native.reason
    measured = float(native.reason.split("cosine to fp32 ")[1].split()[0])
    assert (native.precision == "bf16") == (measured >= 0.999)
    emulated = decide_precision(model, cells, "auto", "cpu", native_bf16=lambda: False)
    assert emulated.precision == "fp32" and "no native bf16" in emulated.reason


def test_decide_precision_keeps_the_tiny_preset_in_fp32_on_any_cpu(tiny_model_and_cells):
    from scfm.model import ModelConfig, XTrimoGene

    _, cells = tiny_model_and_cells
    tiny = XTrimoGene(ModelConfig.preset("tiny", n_genes=300), seed=0).eval()
    choice = decide_precision(tiny, cells, "auto", "cpu", native_bf16=lambda: True)
    assert choice.precision == "fp32" and "64-d encoder" in choice.reason


def test_resumed_training_on_auto_keeps_the_checkpoints_precision():
    from scfm.train.pretrain import training_precision

    recorded = {"precision": "bf16", "precision_reason": "auto on CPU: native bf16, min per-cell cosine ..."}
    kept = training_precision("auto", "cpu", False, never_called, 768, resumed=recorded)
    assert kept.precision == "bf16" and kept.reason.startswith("auto, resumed")
    # an explicit request is a new decision
    assert training_precision("fp32", "cpu", False, never_called, 768, resumed=recorded).precision == "fp32"
    fresh = training_precision("auto", "cpu", False, never_called, 64, resumed=None)
    assert fresh.precision == "fp32"
