"""workers.fsdp on one process (a gloo group of one): where a sharded model's tensors live with
cpu_offload, what the full-model gathers hand over, and one device mesh per run."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import workers.fsdp as fsdp
from workers.fsdp import ShardingSpec, build_sharded_model, placement
from workers.model import load_config


@pytest.fixture
def one_rank(tmp_path):
    """A one-process group; in-process trainer tests run before may have left theirs."""
    if dist.is_initialized():
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def test_cpu_offload_keeps_parameters_on_the_host_and_sends_only_buffers_to_the_device():
    # The decision, for a GPU this machine lacks: torchtitan's init_device / buffer_device.
    cuda = torch.device("cuda", 0)
    assert placement(cuda, cpu_offload=True) == (torch.device("cpu"), cuda)
    assert placement(cuda, cpu_offload=False) == (cuda, cuda)
    assert placement(torch.device("cpu"), cpu_offload=True) == (torch.device("cpu"), torch.device("cpu"))


def test_the_offloaded_model_is_placed_apart_on_a_device_other_than_the_cpu(tiny_model, one_rank, monkeypatch):
    """The real load path, with `meta` standing in for the GPU: before the fix every parameter
    went to the device (model.to(cuda)), which FSDP2's CPUOffloadPolicy refuses."""
    placed = []
    real_place = fsdp._place

    def place_on_meta(model, param_device, buffer_device, empty):
        placed.append((param_device, buffer_device))
        # As on a GPU, but with `meta` for the device; then the buffers put back so the load can finish here.
        kept = [(m, name, b) for m in model.modules() for name, b in m.named_buffers(recurse=False)]
        real_place(model, param_device, torch.device("meta"), empty)
        seen["params"] = {p.device.type for p in model.parameters()} | {local(p).device.type for p in model.parameters()}
        seen["buffers"] = {b.device.type for b in model.buffers()}
        for m, name, b in kept:
            m._buffers[name] = b

    seen = {}
    monkeypatch.setattr(fsdp, "_place", place_on_meta)
    monkeypatch.setattr(fsdp, "placement", lambda device, cpu_offload: (torch.device("cpu"), torch.device("cuda")) if cpu_offload
                        else (torch.device("cuda"), torch.device("cuda")))
    config = load_config(str(tiny_model))
    model = build_sharded_model(str(tiny_model), config, ShardingSpec(cpu_offload=True), torch.device("cpu"), 1)
    assert placed == [(torch.device("cpu"), torch.device("cuda"))]  # the spec's cpu_offload reached the decision
    assert seen["params"] == {"cpu"}
    assert seen["buffers"] == {"meta"}  # the rotary table: the only buffer, and it moved
    # The model loaded with its weights (FSDP2 accepted the CPU parameters and trains).
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    assert torch.isfinite(loss) and all(local(p.grad).device.type == "cpu" for p in model.parameters())
