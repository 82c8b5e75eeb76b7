"""Tests of the GPU and model catalogues (archipelago.decide.catalog)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from archipelago.decide.catalog import (
    CatalogError,
    CatalogFileError,
    GPUSpec,
    ModelSpec,
    dtype_bytes,
    load_gpu_catalog,
    load_model_catalog,
    policies_dir,
)

REQUIRED_GPUS = {
    "H100-SXM",
    "H100-PCIe",
    "H200",
    "A100-80GB",
    "A100-40GB",
    "L40S",
    "L4",
    "A10G",
    "T4",
    "MI300X",
    "B200",
}


def test_policies_dir_is_the_repository_one_by_default(monkeypatch):
    monkeypatch.delenv("ARCHIPELAGO_POLICIES", raising=False)
    d = policies_dir()
    assert d == Path(__file__).resolve().parents[1] / "policies"
    assert (d / "gpus.yaml").is_file()


def test_policies_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHIPELAGO_POLICIES", str(tmp_path))
    assert policies_dir() == tmp_path


def test_gpu_catalogue_has_the_required_gpus_with_sources():
    cat = load_gpu_catalog()
    assert set(cat.names()) >= REQUIRED_GPUS
    for name in cat.names():
        g = cat.get(name)
        assert g.source.strip(), name
        assert g.efficiency.source.strip(), name
        assert g.product_labels, name
        assert g.interconnect_kind in ("nvlink", "pcie", "infinity-fabric")


def test_gpu_datasheet_values_match_facts():
    cat = load_gpu_catalog()
    h100 = cat.get("H100-SXM")
    assert (h100.bf16_tflops, h100.fp8_tflops, h100.hbm_bandwidth_gb_s, h100.tdp_w) == (989, 1979, 3350, 700)
    a100 = cat.get("A100-80GB")
    assert (a100.bf16_tflops, a100.fp8_tflops, a100.hbm_bandwidth_gb_s, a100.memory_gib) == (
        312,
        None,
        2039,
        80,
    )
    assert cat.get("L4").peak_tflops("fp8") == 242
    assert cat.get("A100-80GB").peak_tflops("fp8") == 312  # no FP8 tensor cores: BF16 peak
    # splitwise-sim power model for the calibrated GPUs
    assert (a100.idle_w, a100.prefill_w, a100.decode_w) == (63, 400, 250)
    assert (h100.idle_w, h100.prefill_w, h100.decode_w) == (75, 700, 380)


def test_gpu_lookup_is_case_insensitive_and_unknown_names_list_the_known_ones():
    cat = load_gpu_catalog()
    assert cat.get("h100_sxm").name == "H100-SXM"
    assert "a100-80gb" in cat
    with pytest.raises(CatalogError) as ei:
        cat.get("V100")
    assert isinstance(ei.value, KeyError)
    msg = str(ei.value)
    assert "V100" in msg and "H100-SXM" in msg and "L4" in msg


def test_gpu_by_product_label():
    cat = load_gpu_catalog()
    assert cat.by_product_label("NVIDIA-H100-80GB-HBM3").name == "H100-SXM"
    assert cat.by_product_label("NVIDIA-A100-SXM4-80GB").name == "A100-80GB"
    assert cat.by_product_label("NVIDIA-L4").name == "L4"
    assert cat.by_product_label("Tesla-T4").name == "T4"
    assert cat.by_product_label("AMD_Instinct_MI300X_OAM").name == "MI300X"
    # GFD time-slicing suffix
    assert cat.by_product_label("NVIDIA-A100-SXM4-80GB-SHARED").name == "A100-80GB"
    with pytest.raises(CatalogError, match="NVIDIA-H100-80GB-HBM3"):
        cat.by_product_label("NVIDIA-GeForce-RTX-4090")


def test_gpu_overrides_are_validated():
    g = load_gpu_catalog().get("L4")
    cheaper = g.with_overrides(price_per_gpu_hour=0.5)
    assert cheaper.price_per_gpu_hour == 0.5 and g.price_per_gpu_hour == 0.80
    with pytest.raises(ValidationError):
        g.with_overrides(price_per_gpu_hour=-1)
    with pytest.raises(ValidationError, match="usable_memory_gib"):
        g.with_overrides(usable_memory_gib=30)


def test_catalogue_loads_are_cached():
    assert load_gpu_catalog() is load_gpu_catalog()
    assert load_model_catalog() is load_model_catalog()


def test_model_catalogue_entries_and_aliases():
    cat = load_model_catalog()
    for name in (
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-70B-Instruct",
        "meta-llama/Llama-2-70b-hf",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "Qwen/Qwen3-30B-A3B",
        "Qwen/Qwen2.5-7B-Instruct",
    ):
        assert cat.get(name).source
    assert cat.get("llama-3.1-8b").name == "meta-llama/Llama-3.1-8B-Instruct"
    assert cat.get("LLAMA-3.1-8B").name == "meta-llama/Llama-3.1-8B-Instruct"
    assert cat.get("Llama-3.1-8B-Instruct").name == "meta-llama/Llama-3.1-8B-Instruct"  # id without org
    assert cat.get("mixtral-8x7b").is_moe
    with pytest.raises(CatalogError) as ei:
        cat.get("gpt-5")
    assert "llama-3.1-8b" in str(ei.value) and "meta-llama/Llama-3.1-8B-Instruct" in str(ei.value)


def test_derived_parameter_counts_match_published_counts():
    cat = load_model_catalog()
    # (model, total, active) in billions, published numbers
    for name, total, active in (
        ("llama-3.1-8b", 8.03, 8.03),
        ("llama-3.1-70b", 70.55, 70.55),
        ("llama-2-70b", 68.98, 68.98),
        ("mixtral-8x7b", 46.70, 12.88),
        ("qwen3-30b-a3b", 30.53, 3.35),
        ("qwen2.5-7b", 7.62, 7.62),
    ):
        spec = cat.get(name)
        inline = ModelSpec.model_validate(spec.model_dump(exclude={"total_params", "active_params"}))
        assert inline.total_params / 1e9 == pytest.approx(total, rel=0.005), name
        assert inline.active_params / 1e9 == pytest.approx(active, rel=0.005), name


def test_kv_bytes_per_token():
    cat = load_model_catalog()
    # 2 (K,V) x layers x kv_heads x head_dim x 2 bytes
    assert cat.get("llama-3.1-8b").kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    assert cat.get("llama-2-70b").kv_bytes_per_token() == 2 * 80 * 8 * 128 * 2
    assert cat.get("llama-2-70b").kv_bytes_per_token("fp8") == 2 * 80 * 8 * 128
    assert cat.get("qwen3-30b-a3b").kv_bytes_per_token() == 2 * 48 * 4 * 128 * 2


def test_inline_model_spec_derives_defaults_and_rejects_inconsistency():
    m = ModelSpec(
        name="my/dense", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=100
    )
    assert m.num_kv_heads == 4 and m.head_dim == 16
    # 2 layers x (4*64*64 attention + 2*64 norms + 3*64*128 MLP) + 2*100*64 embeddings + 64 final norm
    assert m.total_params == 2 * (4 * 64 * 64 + 2 * 64 + 3 * 64 * 128) + 2 * 100 * 64 + 64
    assert m.active_params == m.total_params
    with pytest.raises(ValidationError, match="total_params"):
        ModelSpec(
            name="x",
            num_layers=2,
            hidden_size=64,
            num_heads=4,
            intermediate_size=128,
            vocab_size=100,
            total_params=1e9,
        )
    with pytest.raises(ValidationError, match="num_kv_heads"):
        ModelSpec(
            name="x",
            num_layers=2,
            hidden_size=64,
            num_heads=6,
            num_kv_heads=4,
            head_dim=16,
            intermediate_size=128,
            vocab_size=100,
        )
    with pytest.raises(ValidationError, match="head_dim"):
        ModelSpec(name="x", num_layers=2, hidden_size=64, num_heads=6, intermediate_size=128, vocab_size=100)
    with pytest.raises(ValidationError, match="experts_per_token"):
        ModelSpec(
            name="x",
            num_layers=2,
            hidden_size=64,
            num_heads=4,
            intermediate_size=128,
            vocab_size=100,
            num_experts=8,
            experts_per_token=9,
        )
    with pytest.raises(ValidationError, match="dtype"):
        ModelSpec(
            name="x",
            num_layers=2,
            hidden_size=64,
            num_heads=4,
            intermediate_size=128,
            vocab_size=100,
            dtype="float12",
        )
    with pytest.raises(ValidationError):  # typo in a field name is refused, not ignored
        ModelSpec(
            name="x",
            num_layers=2,
            hidden_size=64,
            num_heads=4,
            intermediate_size=128,
            vocab_size=100,
            num_expert=8,
        )


def test_model_spec_from_hf_config_accepts_config_json_keys():
    cfg = {
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000,
        "rope_theta": 1e6,
    }
    m = ModelSpec.from_hf_config("mistralai/Mixtral-8x7B-v0.1", cfg)
    assert m.is_moe and m.num_experts == 8 and m.experts_per_token == 2
    assert m.total_params / 1e9 == pytest.approx(46.7, rel=0.01)
    assert m.active_params / 1e9 == pytest.approx(12.9, rel=0.01)
    # the aliases also work through model_validate
    m2 = ModelSpec.model_validate(
        {
            "name": "x",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 100,
        }
    )
    assert m2.num_layers == 2


def test_dtype_bytes():
    assert dtype_bytes("bfloat16") == 2 and dtype_bytes("FP8") == 1 and dtype_bytes("int4") == 0.5
    with pytest.raises(ValueError, match="bfloat16"):
        dtype_bytes("float12")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_bad_gpu_file_error_names_file_line_entry_and_field(tmp_path):
    good = load_gpu_catalog().get("L4").model_dump(exclude={"name"})
    import yaml

    doc = {
        "gpus": {
            "GOOD": {**good, "product_labels": ["X-1"]},
            "BAD": {**good, "product_labels": ["X-2"], "hbm_bandwidth_gb_s": -5},
        }
    }
    p = tmp_path / "gpus.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(CatalogFileError) as ei:
        load_gpu_catalog(p)
    msg = str(ei.value)
    assert str(p) in msg and "BAD" in msg and "hbm_bandwidth_gb_s" in msg
    line = next(i for i, text in enumerate(p.read_text().splitlines(), 1) if text.startswith("  BAD:"))
    assert f"{p}:{line}:" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    p = _write(tmp_path, "models.yaml", "models:\n  a: [unclosed\n")
    with pytest.raises(CatalogFileError, match="invalid YAML"):
        load_model_catalog(p)
    with pytest.raises(CatalogFileError, match="ARCHIPELAGO_POLICIES"):
        load_model_catalog(tmp_path / "nope.yaml")
    p2 = _write(tmp_path, "m2.yaml", "something_else: {}\n")
    with pytest.raises(CatalogFileError, match="models:"):
        load_model_catalog(p2)


def test_duplicate_alias_is_refused(tmp_path):
    p = _write(
        tmp_path,
        "models.yaml",
        """\
        models:
          org/a:
            aliases: [same]
            num_layers: 2
            hidden_size: 64
            num_heads: 4
            intermediate_size: 128
            vocab_size: 100
          org/b:
            aliases: [same]
            num_layers: 2
            hidden_size: 64
            num_heads: 4
            intermediate_size: 128
            vocab_size: 100
        """,
    )
    with pytest.raises(CatalogFileError, match="same"):
        load_model_catalog(p)


def test_gpu_spec_rejects_idle_above_tdp():
    data = load_gpu_catalog().get("T4").model_dump()
    data["idle_w"] = 100
    with pytest.raises(ValidationError, match="idle_w"):
        GPUSpec.model_validate(data)
