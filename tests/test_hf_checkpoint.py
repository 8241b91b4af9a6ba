"""Reading experts from HF checkpoints: layouts, shards, model id of the files, partial reads."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from coordinator.models.tiny import build_tiny_model
from protos.hf_checkpoint import CheckpointError, HFCheckpoint, load_manifest

pytestmark = pytest.mark.unit  # pure logic: the fast subset


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_tiny_model("qwen2_moe", seed=0)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "per_expert")
    model.save_pretrained(root / "stacked", save_original_format=False)
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return root, model


def test_every_layout_gives_the_same_experts(saved):
    root, model = saved
    ckpts = {name: HFCheckpoint(root / name) for name in ("per_expert", "stacked", "sharded")}
    assert json.loads((root / "sharded" / "model.safetensors.index.json").read_text())  # really sharded
    assert len({c.key_files[k] for c in [ckpts["sharded"]] for k in c.expert_keys()}) > 1
    experts = model.model.layers[1].mlp.experts
    for ckpt in ckpts.values():
        got = ckpt.read_expert(1, 5)
        assert torch.equal(got["gate_up_proj"], experts.gate_up_proj[5])
        assert torch.equal(got["down_proj"], experts.down_proj[5])
    # the id is of the files: other layouts of the same weights are other files, other ids
    assert len({load_manifest(c).model_id for c in ckpts.values()}) == 3
    # shared experts are dense: never listed as routed experts
    assert not any("shared_expert" in k for k in ckpts["per_expert"].expert_keys())


def test_model_id_is_of_the_files_hashed_once(saved, tmp_path):
    root, _ = saved
    ckpt = HFCheckpoint(root / "sharded")
    first = load_manifest(ckpt)
    assert first.model_id.startswith("qwen2-moe-") and set(first.files) == set(ckpt.weight_files)
    cache = json.loads((root / "sharded" / "moe_swarm_manifest.json").read_text())
    assert {n: e["sha256"] for n, e in cache["files"].items()} == first.files
    assert load_manifest(ckpt) == first
    # same files elsewhere: same id; one byte changed in one file: another id
    copy = tmp_path / "copy"
    shutil.copytree(root / "sharded", copy, ignore=shutil.ignore_patterns("moe_swarm_manifest.json"))
    assert load_manifest(HFCheckpoint(copy)).model_id == first.model_id
    shard = copy / ckpt.weight_files[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(1, 1))  # a new mtime: the cached sha256 no longer counts
    changed = load_manifest(HFCheckpoint(copy))
    assert changed.model_id != first.model_id
    assert {n for n in first.files if first.files[n] != changed.files[n]} == {shard.name}


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        HFCheckpoint(tmp_path)


def test_broken_files_are_named_in_one_line(saved, tmp_path):
    root, _ = saved
    shutil.copytree(root / "per_expert", tmp_path / "ckpt")
    (weights,) = (tmp_path / "ckpt").glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match=rf"{weights.name} is not a readable safetensors file .*download it"):
        HFCheckpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "mixtral",')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        HFCheckpoint(tmp_path / "ckpt")


def test_llama4_experts_are_slices_of_its_stacked_tensors(tmp_path):
    # transformers writes Llama4's experts stacked whatever the format asked: [E, H, 2I], [E, I, H]
    model = build_tiny_model("llama4_text", seed=0)
    model.save_pretrained(tmp_path / "original")
    model.save_pretrained(tmp_path / "stacked", save_original_format=False)
    ckpts = [HFCheckpoint(tmp_path / name) for name in ("original", "stacked")]
    for ckpt in ckpts:
        assert ckpt.layers == model.config.moe_layers == [1, 3]  # layers 0 and 2 are dense
        assert ckpt.expert_keys() == {
            f"model.layers.{layer}.feed_forward.experts.{name}"
            for layer in (1, 3)
            for name in ("gate_up_proj", "down_proj")
        }
        experts = model.model.layers[3].feed_forward.experts
        got = ckpt.read_expert(3, 6)
        assert torch.equal(got["gate_up_proj"], experts.gate_up_proj[6])
        assert torch.equal(got["down_proj"], experts.down_proj[6])
    assert all(load_manifest(c).model_id.startswith("llama4-text-") for c in ckpts)
