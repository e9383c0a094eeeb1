"""Rank 0's generation copy: gathered in its own dtype, one tensor at a time, and placed by a
decision made again at every refresh (one process, a gloo group of one)."""

import torch

import workers.replica as replica
from config.env import DistEnv
from trainer.distributed import init_distributed
from workers.fsdp import ShardingSpec, build_sharded_model, gather_full_state_dict, gather_full_state_dict_as
from workers.model import load_config

GB = 2**30


def test_placement_counts_memory_the_caching_allocator_holds():
    # A 7B bf16 copy (14 GB) needs 28 GB: the driver's free memory alone says no...
    assert not replica.fits_on_device(14 * GB, free_bytes=20 * GB, reusable_bytes=0)
    # ...but 10 GB reserved by our allocator and unused is ours to use.
    assert replica.fits_on_device(14 * GB, free_bytes=20 * GB, reusable_bytes=10 * GB)
    # A copy already on the device counts its own memory as available to itself.
    assert replica.fits_on_device(14 * GB, free_bytes=16 * GB, reusable_bytes=0, own_bytes=14 * GB)
    assert replica.pick_replica_device("auto", torch.device("cpu"), 14 * GB) == torch.device("cpu")


def test_the_copy_is_gathered_in_its_dtype_and_placed_at_every_refresh(tiny_model, monkeypatch):
    ctx = init_distributed(DistEnv(0, 0, 1, False), "cpu")
    config = load_config(str(tiny_model))
    sharded = build_sharded_model(str(tiny_model), config, ShardingSpec(), ctx.device, 1)
    full = gather_full_state_dict(sharded)
    as_bf16 = gather_full_state_dict_as(sharded, torch.bfloat16)
    assert as_bf16.keys() == full.keys()
    for name, tensor in full.items():
        assert as_bf16[name].dtype == torch.bfloat16 and as_bf16[name].device.type == "cpu", name
        assert torch.equal(as_bf16[name], tensor.to(torch.bfloat16)), name
    assert all(torch.equal(t, full[n]) for n, t in gather_full_state_dict_as(sharded, None).items())

    decisions = []

    def decide(setting, train_device, param_bytes, own_bytes=0):
        decisions.append(param_bytes)
        return torch.device("cpu")

    monkeypatch.setattr(replica, "pick_replica_device", decide)
    copy = replica.ModelReplica(config, "bf16", "auto", ctx.device, torch.float32)
    for _ in range(2):
        model = copy.refresh(sharded)
    bf16_bytes = sum(t.numel() for t in full.values()) * 2
    assert decisions == [bf16_bytes, bf16_bytes]  # decided at each refresh, on the copy's own size
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_device_copy_is_released_after_the_event_and_a_host_copy_kept(tiny_model, monkeypatch):
    """The copy on a GPU is counted against the memory the training step left cached: only right
    while training is paused, so it is dropped after each sample event (`meta` stands in for the GPU)."""
    ctx = init_distributed(DistEnv(0, 0, 1, False), "cpu")
    config = load_config(str(tiny_model))
    sharded = build_sharded_model(str(tiny_model), config, ShardingSpec(), ctx.device, 1)
    host = replica.ModelReplica(config, "bf16", "cpu", ctx.device, torch.float32)
    kept = host.refresh(sharded)
    assert host.release() is False and host.model is kept  # host memory: kept, the next refresh only gathers
    assert host.refresh(sharded) is kept

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    on_device = replica.ModelReplica(config, "bf16", "cpu", ctx.device, torch.float32)
    on_device.refresh(sharded)
    on_device.model.to_empty(device="meta")  # as if it had been placed on the training GPU
    assert on_device.release() is True and on_device.model is None
    assert emptied == []  # `meta` is no CUDA device: nothing to empty; a cuda copy would empty the cache
    assert on_device.release() is False
    rebuilt = on_device.refresh(sharded)  # the next event builds it again, with the current weights
    full = gather_full_state_dict(sharded)
    assert all(torch.equal(rebuilt.state_dict()[k], v.to(torch.bfloat16)) for k, v in full.items())


def test_gather_is_every_ranks_and_load_rank_0s(tiny_model):
    ctx = init_distributed(DistEnv(0, 0, 1, False), "cpu")
    config = load_config(str(tiny_model))
    sharded = build_sharded_model(str(tiny_model), config, ShardingSpec(), ctx.device, 1)
    copy = replica.ModelReplica(config, "fp32", "cpu", ctx.device, torch.float32)
    state = copy.gather(sharded)  # the collective part: outside the caller's try
    assert copy.model is None and state.keys() == gather_full_state_dict(sharded).keys()
    model = copy.load(state)  # rank 0's part: a failure here only warns in the caller
    assert model is copy.model and copy.last_gather_s > 0
