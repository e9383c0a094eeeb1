"""workers.fsdp on one process (a gloo group of one): where a sharded model's tensors live with
cpu_offload, what the full-model gathers hand over, and one device mesh per run."""

import pytest
import torch
from torch.distributed.tensor import DTensor

import workers.fsdp as fsdp
from workers.fsdp import ShardingSpec, build_sharded_model, placement
from workers.model import load_config


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


# ---------------------------------------------------------------------- full-model gathers
@pytest.fixture
def sharded(tiny_model, one_rank):
    return build_sharded_model(str(tiny_model), load_config(str(tiny_model)), ShardingSpec(), torch.device("cpu"), 1)


def test_the_gather_casts_each_shard_before_it_is_gathered(sharded, monkeypatch):
    gathered_dtypes = []
    real = DTensor.full_tensor

    def spy(self, *args, **kwargs):
        gathered_dtypes.append(self.dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DTensor, "full_tensor", spy)
    state = fsdp.gather_full_state_dict_as(sharded, torch.bfloat16)
    # Every all-gather moved bf16 (half the bytes of the fp32 masters), not fp32 cast afterwards.
    assert gathered_dtypes and set(gathered_dtypes) == {torch.bfloat16}
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    masters = fsdp.gather_full_state_dict(sharded)
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in masters.items())


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000], ids=["one-file", "sharded-files"])
def test_the_streamed_hf_save_holds_what_save_pretrained_wrote(tiny_model, sharded, tmp_path, max_shard_bytes):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint import HFAssets, stream_hf_weights, write_hf_model
    from workers.model import load_tokenizer

    config = load_config(str(tiny_model))
    before = write_hf_model(fsdp.gather_full_state_dict(sharded), HFAssets(config, load_tokenizer(str(tiny_model)), str(tiny_model)),
                            tmp_path / "before", torch.bfloat16)
    streamed = tmp_path / "streamed"
    stream_hf_weights(sharded, torch.bfloat16, streamed, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))

    def tensors(directory):
        out = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                assert f.metadata() == {"format": "pt"}
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    want, got = tensors(before), tensors(streamed)
    assert got.keys() == want.keys() and "lm_head.weight" not in got  # the tied head once, as save_pretrained does
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype == torch.bfloat16 and torch.equal(got[name], tensor), name
    files = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert files == (["model.safetensors"] if max_shard_bytes is None else [f"model-0000{i}-of-0000{len(files)}.safetensors"
                                                                             for i in range(1, len(files) + 1)])
    if max_shard_bytes:
        assert len(files) > 1 and (streamed / "model.safetensors.index.json").is_file()
    # And transformers loads it like the directory save_pretrained wrote.
    for name in ("config.json",):
        (streamed / name).write_bytes((before / name).read_bytes())
    ids = torch.tensor([[1, 5, 7, 2]])
    logits = [AutoModelForCausalLM.from_pretrained(d)(input_ids=ids).logits for d in (before, streamed)]
    assert torch.equal(*logits)


# ---------------------------------------------------------------------- one mesh per run
MESH_SCRIPT = """
import json, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from workers.fsdp import device_mesh
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=16)
groups = lambda: len(dist.distributed_c10d._world.pg_map)
before = groups()
meshes = [device_mesh(torch.device("cpu"), 16, 8) for _ in range(3)]  # actor, reference, critic
after_hsdp = groups()
flat = [device_mesh(torch.device("cpu"), 16, -1), device_mesh(torch.device("cpu"), 16, 16)]
print(json.dumps({"new_groups": after_hsdp - before, "same": all(m is meshes[0] for m in meshes),
                  "shape": list(meshes[0].shape), "flat_same": flat[0] is flat[1], "flat_shape": list(flat[0].shape)}))
"""


def test_hsdp_builds_its_device_mesh_once_for_every_model_of_the_run():
    import json
    import subprocess
    import sys

    from helpers import ROOT

    # Its own process: the fake process group (16 ranks) is that process's default group.
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"] and got["shape"] == [2, 8]
    # One 2-D mesh: its two dimensions' groups (was: two more per model, six for actor+reference+critic).
    assert got["new_groups"] == 2, got
    assert got["flat_same"] and got["flat_shape"] == [16]


def test_building_on_meta_leaves_the_callers_config_declaring_its_own_dtype(tiny_model, one_rank):
    # transformers' from_config sets config.dtype in place. Ranks other than 0 build on meta from
    # the trainer's shared config, rank 0 loads its own: with the mutation the ranks disagreed on
    # the declared dtype the final export casts to, and gathered different sizes (bf16 masters
    # on 2 ranks crashed in gloo; on CUDA: a bf16 generation copy on rank 0 against fp32 masters).
    from workers.model import build_from_config

    config = load_config(str(tiny_model))
    declared = config.dtype
    model = build_from_config(config, torch.bfloat16, "meta")
    assert model.config.dtype == torch.bfloat16 and config.dtype == declared != torch.bfloat16
    build_sharded_model(str(tiny_model), config, ShardingSpec(master_dtype=torch.bfloat16), torch.device("cpu"), 1)
    assert config.dtype == declared


def test_bf16_masters_are_bf16_on_rank_zero_too_where_transformers_keeps_modules_in_fp32(tiny_model, one_rank, monkeypatch):
    # Rank 0 loads with from_pretrained, which keeps `_keep_in_fp32_modules_strict` in fp32 under
    # bf16; the other ranks build on meta, which does not: the shards must agree.
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["norm"])
    config = load_config(str(tiny_model))
    model = build_sharded_model(str(tiny_model), config, ShardingSpec(master_dtype=torch.bfloat16), torch.device("cpu"), 1)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
