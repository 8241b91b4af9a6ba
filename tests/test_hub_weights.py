"""Weights from a Hub (tests/hub_server.py) with the real client: each side receives only its bytes."""

from __future__ import annotations

import pytest
import torch

from coordinator.models.hf import checkpoint_info, load_swarm_model
from peer.backends.hf import HFHostedExperts
from protos.hf_checkpoint import HFCheckpoint, load_manifest
from protos.weights import PEER, HubCheckpoint, WeightsError, fetch_for_peer, open_checkpoint
from protos.weights.spans import total

from .conftest import local_model
from .hub_fixtures import expert_spans, header_bytes, hub_fixture, save_sharded, sent_inside, sent_to  # noqa: F401
from .test_hf_swarm import InProcessExperts, assert_matches_local

REPO = "org/tiny-mixtral"
PAIRS = [(layer, e) for layer in (0, 1) for e in (2, 5)]  # 2 of 8 experts of every layer


@pytest.fixture(scope="module", params=["per_expert", "stacked"])
def full(request, tmp_path_factory):
    folder = save_sharded(tmp_path_factory.mktemp("hub") / request.param, stacked=request.param == "stacked")
    assert len(list(folder.glob("*.safetensors"))) >= 2
    return folder


def test_peer_receives_only_its_experts_bytes(hub, full, tmp_path):
    hub.add_repo(REPO, full)
    folder = fetch_for_peer(REPO, None, PAIRS, tmp_path / "cache", progress=False)
    log = hub.take_log()
    experts = expert_spans(full)
    ours = expert_spans(full, PAIRS)
    share = sum(total(s) for s in experts.values()) * len(PAIRS) // (2 * 8)
    assert sum(total(s) for s in ours.values()) == share
    received = sent_to(log)
    print(
        f"\n{full.name}: peer received {received} B of weight files: experts {share} B, headers {header_bytes(full)} B"
    )
    assert received <= 1.05 * (share + header_bytes(full))
    assert sent_inside(log, experts) == sent_inside(log, ours) == share  # no byte of another expert
    partial, whole = HFCheckpoint(folder), HFCheckpoint(full)
    for pair in PAIRS:
        got, want = partial.read_expert(*pair), whole.read_expert(*pair)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # the sparse files hold little more than what was downloaded
    on_disk = sum(f.stat().st_blocks * 512 for f in folder.glob("*.safetensors"))
    assert on_disk < received + 3 * 64 * 1024


def test_replacement_downloads_only_the_new_experts(hub, full, tmp_path):
    hub.add_repo(REPO, full)
    fetch_for_peer(REPO, None, PAIRS, tmp_path, progress=False)
    hub.take_log()
    moved = [(0, 5), (1, 2), (0, 7), (1, 0)]  # two kept, two new
    fetch_for_peer(REPO, None, moved, tmp_path, progress=False)
    log = hub.take_log()
    new = expert_spans(full, [(0, 7), (1, 0)])
    headers = sum(t.sent for t in log if t.start == 0)  # headers re-checked before adding to a cached file
    assert sent_inside(log, expert_spans(full)) == sent_to(log) - headers == sum(total(s) for s in new.values())
    fetch_for_peer(REPO, None, moved, tmp_path, progress=False)
    assert hub.take_log() == []  # all cached: nothing read from the network


class RecordingSafeOpen:
    """transformers' safe_open, recording which tensors it materialises (reads bytes of)."""

    def __init__(self, real, read: set[str]) -> None:
        self.real, self.read = real, read

    def __call__(self, *args, **kwargs):
        owner = self

        class File:
            def __init__(self, f) -> None:
                self.f = f

            def get_slice(self, key):
                return Slice(self.f.get_slice(key), key)

            def get_tensor(self, key):
                owner.read.add(key)
                return self.f.get_tensor(key)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        class Slice:
            def __init__(self, s, key) -> None:
                self.s, self.key = s, key

            def __getitem__(self, index):
                owner.read.add(self.key)
                return self.s[index]

            def __getattr__(self, name):
                return getattr(self.s, name)

        return File(self.real(*args, **kwargs))


def test_coordinator_receives_no_routed_expert_byte_and_matches_the_local_model(hub, full, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    hub.add_repo(REPO, full)
    info = checkpoint_info(REPO, cache_dir=tmp_path, progress=False)
    log = hub.take_log()
    assert info.checkpoint.path != full and info.manifest.model_id == load_manifest(HFCheckpoint(full)).model_id
    experts = expert_spans(full)
    dense = sum(f.stat().st_size for f in full.glob("*.safetensors")) - sum(total(s) for s in experts.values())
    print(f"\n{full.name}: coordinator received {sent_to(log)} B of weight files (dense + headers {dense} B)")
    assert sent_inside(log, experts) == 0 and sent_to(log) == dense
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {t.file for t in log}

    read: set[str] = set()
    monkeypatch.setattr(mu, "safe_open", RecordingSafeOpen(mu.safe_open, read))
    executor = InProcessExperts(HFHostedExperts.from_checkpoint(full, "*", torch.device("cpu"), progress=False))
    remote = load_swarm_model(REPO, executor, info=info)
    assert read and not read & info.checkpoint.expert_keys()  # transformers read no routed-expert tensor
    assert_matches_local(remote, local_model(full))


def test_interrupted_download_resumes_with_the_missing_bytes_only(hub, full, tmp_path):
    repo = hub.add_repo(REPO, full)
    first = open_checkpoint(REPO, None, tmp_path)
    plan = first.plan(PEER, PAIRS)
    biggest = max(plan.files, key=lambda f: total(f.missing))
    repo.drop_budget[biggest.name] = total(biggest.missing) // 2
    first.retry_wait = 0.01
    hub.take_log()
    with pytest.raises(WeightsError, match=r"network lost while downloading .*run again to resume"):
        first.fetch(PEER, PAIRS, progress=False)
    got_first = sent_to(hub.take_log())
    assert 0 < got_first < plan.missing
    repo.drop_budget.clear()  # the network is back
    second = open_checkpoint(REPO, None, tmp_path)
    missing = second.plan(PEER, PAIRS).missing
    assert missing == plan.missing - got_first  # every byte received was kept
    second.fetch(PEER, PAIRS, progress=False)
    log = hub.take_log()
    rechecked = sum(t.sent for t in log if t.start == 0)  # the header of each file it adds to
    print(f"\nresume: {got_first} B before the drop, {missing} B after it (+{rechecked} B of headers re-checked)")
    assert sent_to(log) - rechecked == missing
    assert second.plan(PEER, PAIRS).missing == 0


def test_model_id_of_the_hub_equals_the_local_folders(hub, full, tmp_path):
    hub.add_repo(REPO, full)
    remote = open_checkpoint(REPO, None, tmp_path)
    assert hub.take_log() and not any(t.start >= 8 and t.end - t.start > 16384 for t in hub.take_log())
    assert remote.model_id == load_manifest(HFCheckpoint(full)).model_id
    assert checkpoint_info(remote.folder).manifest.model_id == remote.model_id  # the partial folder too


@pytest.mark.parametrize("change", ["etag", "header", "listing"])
def test_a_file_changed_under_a_pinned_commit_is_refused(hub, full, tmp_path, change):
    repo = hub.add_repo(REPO, full)
    fetch_for_peer(REPO, None, PAIRS[:1], tmp_path, progress=False)
    name = sorted(expert_spans(full, [PAIRS[-1]]))[-1]  # a file the next placement adds to
    data = bytearray((full / name).read_bytes())
    if change == "header":  # same ETag, other header bytes (same length)
        i = data.index(b'"dtype"')
        data[i + 1 : i + 6] = b"DTYPE"
        repo.keep_etag = True
    else:
        data[-1] ^= 1
    repo.other_bytes[name] = bytes(data)
    if change == "listing":  # the Hub's own listing now names another sha256
        repo.sha256[name] = "0" * 64
    with pytest.raises(WeightsError, match="changed under a pinned commit") as e:
        fetch_for_peer(REPO, None, PAIRS, tmp_path, progress=False)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_a_tag_is_pinned_and_offline_mode_uses_the_cache(hub, full, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = hub.add_repo(REPO, full, tags=("v1",))
    pinned = fetch_for_peer(REPO, "v1", PAIRS[:2], tmp_path, progress=False)
    assert pinned.name == repo.commit
    hub.take_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch_for_peer(REPO, "v1", PAIRS[:2], tmp_path, progress=False) == pinned
    assert hub.take_log() == []
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE is set"):
        fetch_for_peer(REPO, "v1", PAIRS, tmp_path, progress=False)
    with pytest.raises(WeightsError, match=r"HF_HUB_OFFLINE is set .* never downloaded"):
        HubCheckpoint(REPO, "v2", tmp_path)
