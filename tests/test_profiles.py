import dataclasses

import pytest

from roastfx.profiles import PROFILES, HardwareProfile, detect, get_profile

EXPECTED = ("h100", "h200", "a100", "l4", "rtx4090", "cpu-avx2", "cpu-avx512", "cpu-neon")


def test_every_expected_profile_is_listed_with_sane_figures():
    assert set(EXPECTED) <= set(PROFILES)
    for name, p in PROFILES.items():
        assert p.name == name and p.kind in ("gpu", "cpu")
        assert p.cache_line_bytes % p.sector_bytes == 0
        assert p.l2_bytes <= p.llc_bytes or p.kind == "gpu"
        assert p.smem_per_block_bytes <= p.l1_bytes
        # the cost model relies on cache reads being cheaper than DRAM reads
        assert p.l2_gbps > p.dram_gbps > 0
        assert p.peak("bfloat16") >= p.peak("float32") > 0
        assert p.atomic_rate() > 0 and p.units > 0
        assert p.alignment_elements(4) == p.cache_line_bytes // 4
        assert p.alignment_elements(2) == p.cache_line_bytes // 2


def test_datasheet_figures():
    assert PROFILES["h100"].l2_bytes == 50 * 2**20 and PROFILES["h100"].units == 132
    assert PROFILES["h200"].dram_gbps == 4800.0 and PROFILES["h200"].peak("bf16") == PROFILES["h100"].peak("bf16")
    assert PROFILES["a100"].peak("float32") == 19.5 and PROFILES["a100"].units == 108
    assert PROFILES["l4"].dram_gbps == 300.0 and PROFILES["rtx4090"].l2_bytes == 72 * 2**20


def test_peak_dtype_names_and_fallback():
    p = PROFILES["h100"]
    assert p.peak("bf16") == p.peak("bfloat16") == p.peak("torch.bfloat16")
    assert p.peak("fp8") == p.peak("float8_e4m3fn") > p.peak("bfloat16")
    assert p.peak("no-such-dtype") == p.peak("float32")


def test_positional_construction_of_the_first_release_still_works():
    p = HardwareProfile("x", "gpu", "test", 128, 32, 1, 1, 2**20, 2**20, 4, 100.0, 200.0, {"float32": 1.0}, ())
    assert p.alignment_elements(4) == 32 and p.atomic_rate() > 0 and p.kernel_block == (128, 128)


def test_get_profile_by_name_alias_and_object():
    assert get_profile("h100") is PROFILES["h100"]
    assert get_profile(" H100 ") is PROFILES["h100"]
    assert get_profile("cpu-arm64") is PROFILES["cpu-neon"]
    assert get_profile("4090") is PROFILES["rtx4090"]
    custom = dataclasses.replace(PROFILES["l4"], name="mine")
    assert get_profile(custom) is custom
    assert get_profile("auto") is detect()


def test_unknown_target_names_the_value_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown target 'tpu-v5'.*a100.*h100.*auto"):
        get_profile("tpu-v5")
    with pytest.raises(TypeError, match="target must be"):
        get_profile(3)


def test_environment_variable_picks_the_profile(monkeypatch):
    monkeypatch.setenv("ROASTFX_TARGET", "a100")
    assert get_profile(None) is PROFILES["a100"]
    assert get_profile("l4") is PROFILES["l4"]  # an explicit target wins
    monkeypatch.setenv("ROASTFX_TARGET", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        get_profile()
    monkeypatch.delenv("ROASTFX_TARGET")
    assert get_profile() is detect()


def test_unknown_target_from_the_environment_says_so(monkeypatch):
    monkeypatch.setenv("ROASTFX_TARGET", "h10")
    with pytest.raises(ValueError, match=r"^unknown target 'h10' \(set by the environment variable ROASTFX_TARGET\); "
                                         r"known targets: a100, .*h100.*, auto$"):
        get_profile()
    with pytest.raises(ValueError) as err:  # a bad explicit name is not blamed on the variable
        get_profile("h10")
    assert "ROASTFX_TARGET" not in str(err.value) and "unknown target 'h10'" in str(err.value)


def test_detect_matches_the_machine():
    import torch

    assert detect().kind == ("gpu" if torch.cuda.is_available() else "cpu")
