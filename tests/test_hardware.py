"""The hardware catalog (formulas/catalog/hardware.json) and the FLOP/byte formulas (formulas/throughput.py)."""

import json
import re

import pytest

from formulas.catalog import get_shape
from formulas.hardware import CATALOG_PATH, get_hardware, hardware_names
from formulas.throughput import (
    attention_flops,
    decode_flops_per_token,
    expert_fraction_touched,
    gpus_for_deadline,
    matmul_params,
    prefill_flops,
    training_flops_per_token,
    weight_bytes_read_per_step,
)

GiB = 2**30

# The GPUs the planner issue asks for, by a name a user would type.
REQUIRED = ["RTX 3060", "RTX 4060 Ti", "RTX 3090", "RTX 4090", "RTX 4090D", "RTX 5090", "A10", "A10G", "L4", "L40S",
            "RTX A6000", "A100 40GB", "A100 80GB", "H100 PCIe", "H100 SXM", "H200", "B200", "MI300X", "Jetson AGX Orin"]


@pytest.fixture(scope="module")
def doc():
    with open(CATALOG_PATH, encoding="utf-8") as f:
        return json.load(f)


def test_required_gpus_present():
    for name in REQUIRED:
        assert get_hardware(name).name


def test_every_entry_is_complete_and_sourced(doc):
    names, aliases = set(), set()
    for g in doc["gpus"]:
        assert isinstance(g["memory_bytes"], int) and g["memory_bytes"] > 0, g["name"]
        assert g["memory_gb_base"] in ("2^30", "10^9"), g["name"]
        assert isinstance(g["bandwidth_bytes_per_s"], int) and g["bandwidth_bytes_per_s"] > 0
        assert set(g["dense_tflops"]) == {"bf16", "fp16", "fp8", "int8"}
        assert all(v is None or v > 0 for v in g["dense_tflops"].values())
        assert g["dense_tflops"]["bf16"], f"{g['name']}: every GPU here has a bf16/fp16 tensor path"
        assert len(g["sources"]) >= 1 and all(isinstance(s, str) and s for s in g["sources"])
        assert isinstance(g["interconnect"], list)
        assert g["price"] is None or {"amount", "currency", "kind"} <= set(g["price"])
        assert g["name"] not in names
        names.add(g["name"])
        keys = {re.sub(r"[^a-z0-9]", "", a.lower()) for a in [g["name"]] + g["aliases"]}
        assert not keys & aliases, f"{g['name']}: alias {keys & aliases} also names another GPU"
        aliases |= keys


def test_capacities_are_binary_multiples_of_the_nominal_gb(doc):
    for g in doc["gpus"]:
        gb = float(re.match(r"([\d.]+) GB", g["memory_nominal"]).group(1))
        unit = 2**30 if g["memory_gb_base"] == "2^30" else 10**9
        assert g["memory_bytes"] == int(gb * unit), g["name"]


def test_measured_totals_rule_out_the_decimal_reading(doc):
    """Where nvidia-smi/rocm-smi's total is known it exceeds nominal × 10^9: the vendor's GB is 2^30 bytes."""
    seen = 0
    for g in doc["gpus"]:
        t = g["reported_total_bytes"]
        if not t:
            continue
        seen += 1
        gb = float(re.match(r"([\d.]+) GB", g["memory_nominal"]).group(1))
        assert gb * 10**9 < t <= g["memory_bytes"], g["name"]
        assert t >= 0.93 * g["memory_bytes"], f"{g['name']}: more than ECC's 1/16 reserved?"
    assert seen >= 8
    # H200: 143,771 MiB reported, so "141 GB" is 141 GiB, not 141e9 bytes
    assert get_hardware("H200").memory_bytes == 141 * GiB
    assert get_hardware("H200").reported_total_bytes == 143771 * 2**20 > 141 * 10**9


def test_dense_peaks_hand_checked():
    """A few datasheet values, dense (sparse / 2), in FLOP/s."""
    assert get_hardware("H100").dense_flops["bf16"] == pytest.approx(989.4e12)
    assert get_hardware("H100 SXM").dense_flops["fp8"] == pytest.approx(1978.9e12)
    assert get_hardware("A100 80GB").dense_flops["bf16"] == pytest.approx(312e12)
    assert get_hardware("A100 80GB").dense_flops["fp8"] is None
    assert get_hardware("RTX 4090").dense_flops["bf16"] == pytest.approx(165.2e12)
    assert get_hardware("L4").dense_flops["fp8"] == pytest.approx(485e12 / 2)
    assert get_hardware("MI300X").dense_flops["bf16"] == pytest.approx(1307.4e12)
    assert get_hardware("H200").bandwidth_bytes_per_s == 4_800_000_000_000


def test_tensor_paths_order():
    for name in hardware_names():
        f = get_hardware(name).dense_flops
        if f.get("fp8"):
            assert f["fp8"] >= f["bf16"], name
        if f.get("int8"):
            assert f["int8"] >= f["bf16"], name


def test_matmul_path_falls_back_to_compute_dtype():
    a100, h100 = get_hardware("A100 80GB"), get_hardware("H100 SXM")
    assert a100.matmul_flops("fp8") == (312e12, "bf16")  # no fp8 tensor cores on Ampere
    assert h100.matmul_flops("fp8")[1] == "fp8"
    assert h100.matmul_flops("nf4")[1] == "bf16"  # weight-only 4-bit multiplies in the compute dtype
    assert h100.matmul_flops("q4_k_m", "fp16")[1] == "fp16"
    assert a100.matmul_flops("int8")[1] == "int8"


def test_gpu_names_and_aliases():
    assert (get_hardware("RTX 4090").name, get_hardware("RTX 4090").memory_bytes) == ("RTX 4090", 24 * GiB)
    assert get_hardware("4090").name == "RTX 4090"
    assert get_hardware("h100").name == "H100 SXM" == get_hardware("H100 80GB").name
    assert (get_hardware("a100").name, get_hardware("a100").memory_bytes) == ("A100 80GB", 80 * GiB)
    assert "H200" in hardware_names() and len(hardware_names()) == len(set(hardware_names()))
    with pytest.raises(ValueError, match="--gpu GTX 9090"):
        get_hardware("GTX 9090")


# ------------------------------------------------------------------ throughput formulas, hand-worked

def test_matmul_params_drop_the_embedding_lookup():
    s = get_shape("Llama-3.1-8B")
    assert matmul_params(s) == 8_030_261_248 - 128_256 * 4_096 == 7_504_924_672
    tied = get_shape("Qwen2.5-0.5B")  # tied: the embedding matrix is the lm_head matmul
    assert tied.tie_embeddings and matmul_params(tied) == tied.n_params


def test_matmul_params_moe_counts_active_experts():
    s = get_shape("Qwen3-30B-A3B")
    embed = s.vocab * s.hidden
    assert matmul_params(s) == s.n_active_params() - embed
    assert matmul_params(s) < s.n_params / 5


def test_attention_and_prefill_flops_llama_8b():
    s = get_shape("Llama-3.1-8B")
    width = 32 * (128 + 128)  # heads × (qk + v head dim)
    assert attention_flops(s, 1000) == 2 * 32 * width * 1000
    n = 7_504_924_672
    # causal prefill: each of the 4096 tokens attends to 2048 keys on average
    assert prefill_flops(s, 2, 4096) == 2 * 4096 * (2 * n + 2 * 32 * width * 2048)
    assert decode_flops_per_token(s, 100) == 2 * n + 2 * 32 * width * 100


def test_training_flops_per_token_by_method():
    s = get_shape("Llama-3.1-8B")
    n, a = 7_504_924_672, 2 * 32 * (32 * 256) * 1024  # attention over on average half of seq 2048
    assert training_flops_per_token(s, 2048, "full") == 6 * n + 3 * a  # Kaplan: 6N
    assert training_flops_per_token(s, 2048, "full", grad_ckpt=True) == 8 * n + 4 * a  # + one recomputed forward
    assert training_flops_per_token(s, 2048, "lora", trainable_params=1000) == 4 * n + 3 * a + 6 * 1000
    assert training_flops_per_token(s, 2048, "qlora", grad_ckpt=True) == 6 * n + 4 * a
    head = s.vocab * s.hidden
    frz = training_flops_per_token(s, 2048, "freeze", trainable_layers=4)
    assert frz == pytest.approx(2 * n + a + 2 * head + (4 / 32) * (4 * (n - head) + 2 * a))
    # every layer trainable: the full count less the lm_head's weight gradient (it stays frozen)
    assert training_flops_per_token(s, 2048, "freeze", trainable_layers=32) == pytest.approx(6 * n + 3 * a - 2 * head)


def test_moe_decode_reads_only_routed_experts():
    s = get_shape("Qwen3-30B-A3B")  # 128 experts, top-8
    assert expert_fraction_touched(s, 1) == pytest.approx(8 / 128)
    assert expert_fraction_touched(s, 10_000) == pytest.approx(1.0)
    w = 10**9
    one, many = weight_bytes_read_per_step(s, w, 1), weight_bytes_read_per_step(s, w, 512)
    assert one < many <= w
    dense = get_shape("Llama-3.1-8B")
    assert weight_bytes_read_per_step(dense, w, 1) == w


def test_gpus_for_deadline():
    assert gpus_for_deadline(100.0, 10.0, 10.0) == 1
    assert gpus_for_deadline(101.0, 10.0, 10.0) == 2
    assert gpus_for_deadline(1.0, 10.0, 10.0) == 1
    assert gpus_for_deadline(1000.0, 10.0, 10.0) == 10
