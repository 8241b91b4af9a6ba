"""The envelope's pure logic: key files, hellos, seals, replay window."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from protos import envelope
from protos.envelope import EnvelopeError, Identity, ReplayWindow


@pytest.mark.unit
def test_key_file_is_private_and_reloads_the_same_identity(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    a = Identity.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    b = Identity.load_or_create(path)
    assert (a.public, a.kx_public, a.rsa_der) == (b.public, b.kx_public, b.rsa_der)
    with pytest.raises(FileExistsError):
        Identity.generate().save(path)  # never overwrites an identity


@pytest.mark.unit
def test_readable_key_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "peer.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.unit
def test_a_directory_as_key_file_is_named_as_such(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Identity.load(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Identity.load_or_create(tmp_path)


def test_keygen_cli(tmp_path):
    path = tmp_path / "k"
    run = subprocess.run([sys.executable, "-m", "peer", "keygen", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and Identity.load(path).public.hex() in run.stdout
    again = subprocess.run([sys.executable, "-m", "peer", "keygen", str(path)], capture_output=True, text=True)
    assert again.returncode == 2 and "not overwriting" in again.stderr


@pytest.mark.unit
def test_both_sides_derive_the_same_session_and_only_they_can_open():
    client, peer = Identity.generate(), Identity.generate()
    hello, keys = envelope.client_hello(client, peer.kx_public)
    theirs = envelope.accept_hello(peer, hello)
    assert theirs.session_id == keys.session_id
    sealed = envelope.seal(keys.to_peer, 7, b"activations", b"ad")
    assert b"activations" not in sealed
    assert envelope.open_sealed(theirs.to_peer, 7, sealed, b"ad") == b"activations"
    for counter, ad, aead in ((8, b"ad", theirs.to_peer), (7, b"other", theirs.to_peer), (7, b"ad", theirs.to_client)):
        with pytest.raises(EnvelopeError):
            envelope.open_sealed(aead, counter, sealed, ad)


@pytest.mark.unit
def test_forged_and_stale_hellos_are_refused():
    client, peer, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    hello, _ = envelope.client_hello(client, peer.kx_public)
    with pytest.raises(EnvelopeError, match="signature"):  # claims client's identity, signed by mallory
        envelope.accept_hello(
            peer,
            envelope.Hello(
                client.public,
                hello.client_ephemeral,
                hello.timestamp_ms,
                envelope.client_hello(mallory, peer.kx_public)[0].signature,
            ),
        )
    old, _ = envelope.client_hello(client, peer.kx_public, now_ms=envelope.wall_ms() - 300_000)
    with pytest.raises(EnvelopeError, match="stale"):
        envelope.accept_hello(peer, old)
    other_peer = Identity.generate()  # a hello for another peer's key does not verify here
    with pytest.raises(EnvelopeError):
        envelope.accept_hello(other_peer, hello)


@pytest.mark.unit
def test_replay_window_accepts_each_counter_once():
    w = ReplayWindow(size=64)
    assert all(w.accept(c) for c in (5, 3, 4, 100, 99))
    assert not any(w.accept(c) for c in (5, 100, 99, 36))  # repeats, and 36 is past the window
    assert w.accept(37) and not w.accept(37)
    assert w.accept(10_000) and not w.accept(100)
