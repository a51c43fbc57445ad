"""The caching-allocator simulation (harness/tracing/allocator.py) against hand-worked cases of
c10/cuda/CUDACachingAllocator.cpp's rules, and PYTORCH_CUDA_ALLOC_CONF parsed as torch parses it."""

import pytest

from harness.tracing import allocator as A
from harness.tracing.allocator import AllocConfError, CachingAllocatorModel, parse_alloc_conf

MiB = 1 << 20


def test_round_size_default_and_power2_divisions():
    assert A.round_size(1) == 512 and A.round_size(513) == 1024
    cfg = parse_alloc_conf("roundup_power2_divisions:4")
    # 5 MiB + 1 lies between 4 and 8 MiB; four divisions of that interval are 1 MiB apart → 6 MiB
    assert A.round_size(5 * MiB + 1, cfg) == 6 * MiB
    assert A.round_size(4 * MiB, cfg) == 4 * MiB  # a power of two stays
    assert A.round_size(1500, cfg) == 1536  # not above kMinBlockSize × divisions: 512-byte rounding
    # the list form: intervals in MiB; the first value also covers the smaller intervals; '>' fills from the
    # last interval listed on, that one included (std::fill from last_index in parseRoundUpPower2Divisions)
    cfg = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,1024:4]")
    assert cfg.divisions(3 * MiB) == 1 and cfg.divisions(300 * MiB) == 1
    assert cfg.divisions(600 * MiB) == 2 and cfg.divisions(1500 * MiB) == 4 and cfg.divisions(5 << 30) == 0
    cfg = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,>:8]")
    assert cfg.divisions(300 * MiB) == 1 and cfg.divisions(600 * MiB) == 8 and cfg.divisions(5 << 30) == 8


def test_small_pool_packs_into_2_mib_segments():
    m = CachingAllocatorModel()
    for i in range(4096):  # 4096 × 512 B = 2 MiB: exactly one small segment
        m.malloc(i, 100)
    assert m.reserved_bytes == A.K_SMALL_BUFFER and m.allocated_bytes == 4096 * 512
    m.malloc("one more", 100)
    assert m.reserved_bytes == 2 * A.K_SMALL_BUFFER


def test_mid_sized_requests_share_a_20_mib_segment_and_large_ones_get_their_own():
    m = CachingAllocatorModel()
    m.malloc("a", 3 * MiB)  # 1–10 MiB: a 20 MiB segment, split (the 17 MiB rest is > 1 MiB)
    m.malloc("b", 4 * MiB)
    m.malloc("c", 13 * MiB + 1)  # ≥ 10 MiB: the segment's 13 MiB rest is too small; its own, rounded up to 2 MiB
    assert m.reserved_bytes == 20 * MiB + 14 * MiB
    m.free("a")
    m.malloc("d", 2 * MiB + 512)  # best fit: the freed 3 MiB block; its 0.5 MiB rest is not split off
    # allocated counts blocks: c's whole 14 MiB segment (its < 1 MiB rest is not split off) and d's 3 MiB
    assert m.allocated_bytes == 3 * MiB + 4 * MiB + 14 * MiB
    m.free("b")
    m.free("d")  # the whole first segment is free again and merged: 20 MiB in one block
    m.malloc("e", 19 * MiB)
    assert m.reserved_bytes == 34 * MiB


def test_blocks_are_reused_only_on_their_stream():
    m = CachingAllocatorModel()
    m.malloc("a", 30 * MiB, stream=0)
    m.free("a")
    m.malloc("b", 30 * MiB, stream=1)  # the cached block belongs to stream 0
    assert m.reserved_bytes == 60 * MiB
    m.malloc("c", 30 * MiB, stream=0)
    assert m.reserved_bytes == 60 * MiB


def test_max_split_size_keeps_oversize_blocks_whole():
    m = CachingAllocatorModel(parse_alloc_conf("max_split_size_mb:64"))
    m.malloc("big", 100 * MiB)
    m.free("big")
    m.malloc("small", 30 * MiB)  # under max_split_size: may not take the 100 MiB oversize block
    assert m.reserved_bytes == 130 * MiB
    m.malloc("near", 90 * MiB)  # ≥ max_split_size: takes the 100 MiB block (within 20 MiB), unsplit
    assert m.reserved_bytes == 130 * MiB and m.allocated_bytes == 30 * MiB + 100 * MiB
    m.free("near")
    m.malloc("far", 70 * MiB)  # 100 ≥ 70 + 20: too much larger, a new segment
    assert m.reserved_bytes == 200 * MiB
    # without the option the same 30 MiB request would split the cached 100 MiB segment
    d = CachingAllocatorModel()
    d.malloc("big", 100 * MiB)
    d.free("big")
    d.malloc("small", 30 * MiB)
    assert d.reserved_bytes == 100 * MiB


def test_expandable_segments_map_pages_and_avoid_the_new_segment():
    native, exp = CachingAllocatorModel(), CachingAllocatorModel(parse_alloc_conf("expandable_segments:True"))
    for m in (native, exp):
        m.malloc("a", 30 * MiB)
        m.malloc("b", 30 * MiB)
        m.free("a")
        m.free("b")
        m.malloc("c", 50 * MiB)
    assert native.reserved_bytes == 110 * MiB  # two 30 MiB segments cannot hold a 50 MiB block: a third
    assert exp.reserved_bytes == 60 * MiB  # three 20 MiB pages of one segment, reused
    exp.free("c")
    exp.empty_cache()  # every page is free again: all unmapped
    assert exp.reserved_bytes == 0
    exp.malloc("d", 1 * MiB + 1)  # a large request maps one 20 MiB page of the large pool's segment
    assert exp.reserved_bytes == 20 * MiB


def test_expandable_empty_cache_keeps_pages_with_live_blocks():
    m = CachingAllocatorModel(parse_alloc_conf("expandable_segments:True"))
    m.malloc("a", 15 * MiB)  # page 0 (0–20 MiB)
    m.malloc("b", 30 * MiB)  # 15–45 MiB: pages 0–2
    m.free("a")
    m.empty_cache()  # the free 0–15 MiB range holds no whole page: nothing to unmap
    assert m.reserved_bytes == 60 * MiB
    m.free("b")
    m.empty_cache()
    assert m.reserved_bytes == 0


def test_empty_cache_releases_only_unsplit_blocks():
    m = CachingAllocatorModel()
    m.malloc("a", 3 * MiB)  # in a split 20 MiB segment
    m.malloc("b", 40 * MiB)
    m.free("b")
    m.empty_cache()
    assert m.reserved_bytes == 20 * MiB
    m.free("a")
    m.empty_cache()
    assert m.reserved_bytes == 0


def test_out_of_memory_retry_frees_the_cache_then_fails():
    m = CachingAllocatorModel(limit_bytes=100 * MiB)
    m.malloc("a", 60 * MiB)
    m.free("a")
    m.malloc("b", 70 * MiB)  # 60 cached + 70 > 100: the cache is released and the request retried
    assert m.reserved_bytes == 70 * MiB and m.stats.num_alloc_retries == 1
    with pytest.raises(A.AllocatorOOM):
        m.malloc("c", 40 * MiB)
    assert m.stats.num_ooms == 1 and m.allocated_bytes == 70 * MiB


def test_garbage_collection_frees_old_cached_blocks_under_a_fraction():
    cfg = parse_alloc_conf("garbage_collection_threshold:0.5")
    m = CachingAllocatorModel(cfg, limit_bytes=200 * MiB, fraction_limit=True)
    m.malloc("a", 60 * MiB)
    m.malloc("b", 50 * MiB)
    m.free("a")
    m.free("b")  # 110 MiB cached, over half the 200 MiB limit
    m.malloc("c", 70 * MiB)  # no block fits: GC frees cached blocks of at least average age before cudaMalloc
    assert m.reserved_bytes < 110 * MiB + 70 * MiB
    off = CachingAllocatorModel(limit_bytes=200 * MiB, fraction_limit=True)
    for k, n in (("a", 60), ("b", 50)):
        off.malloc(k, n * MiB)
    off.free("a")
    off.free("b")
    off.malloc("c", 70 * MiB)
    assert off.reserved_bytes == 180 * MiB


def test_phase_peaks_start_at_the_phase():
    m = CachingAllocatorModel()
    m.mark("load")
    m.malloc("w", 50 * MiB)
    m.mark("prefill")
    m.malloc("x", 30 * MiB)
    m.free("x")
    m.mark("decode")
    m.malloc("y", 10 * MiB)
    ph = m.stats.phases
    assert ph["load"]["max_allocated_bytes"] == 50 * MiB
    assert ph["prefill"]["max_allocated_bytes"] == 80 * MiB
    assert ph["decode"]["max_allocated_bytes"] == 60 * MiB and ph["decode"]["max_reserved_bytes"] == 80 * MiB


@pytest.mark.parametrize("text, needle", [
    ("max_split_size_mb:10", "too small"),
    ("expandable_segments:yes", "True/False"),
    ("garbage_collection_threshold:1.5", "(0.0, 1.0)"),
    ("roundup_power2_divisions:3", "power of 2"),
    ("max_split_sise_mb:512", "unrecognized"),
    ("backend:cudaMallocAsync", "cudaMallocAsync"),
    ("expandable_segments:True max_split_size_mb:64", "True/False"),  # spaces are dropped: "Truemax_split…"
    ("expandable_segments:True;max_split_size_mb:64", "True/False"),
])
def test_bad_settings_are_refused_as_torch_refuses_them(text, needle):
    with pytest.raises(AllocConfError, match=None) as e:
        parse_alloc_conf(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_settings_read_from_the_environment_as_torch_reads_them():
    cfg, var = A.config_from_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128"})
    assert var == "PYTORCH_CUDA_ALLOC_CONF" and cfg.expandable_segments and cfg.max_split_size == 128 * MiB
    cfg, var = A.config_from_env({"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6",
                                  "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert var == "PYTORCH_ALLOC_CONF" and not cfg.expandable_segments
    assert A.config_from_env({}) == (A.DEFAULT_CONFIG, "")
    assert parse_alloc_conf("release_lock_on_cudamalloc:True,pinned_use_cuda_host_register:False") == \
        A.AllocatorConfig(text="release_lock_on_cudamalloc:True,pinned_use_cuda_host_register:False")
