"""Storage providers with real processes (issue 13, docs/federation.md).

P runs `fluidfs serve --provider`; the operator admits user U with `fluidfs provider
add`. U mounts with `--provider P` and makes an agreement with X, another user's mount:
U's side of it (the shards X stores with U) lives at P. U unmounts and stays away for
several tolerance periods; X's audits and reads of U's side keep passing (P answers
them), U's trust at X does not fall and X's agreement with U does not end. Without a
provider X's audits of U fail while U is away and X ends the agreement once the
tolerance has passed (test_repair.py's
``test_dead_peer_past_tolerance_loses_agreement_and_shards_move``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nacl.signing
import pytest
import trio
from conftest import run_cli
from mounthelpers import drop_cache
from peerhelpers import Peer, endpoint, random_shard, start_all, status, wait_for

from fluidfs import control, keys
from fluidfs.net.errors import RpcError
from fluidfs.net.tcp import open_rpc
from fluidfs.peers.providercode import ProviderCode, read_code

TOLERANCE = 3.0  # seconds X tolerates failing audits before it ends an agreement
HOSTS = 12  # U's `serve` peers besides X, holding U's own data


def peer_rows(state: Path) -> dict[str, dict]:
    result = run_cli("peers", "--json", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return {row["id"]: row for row in json.loads(result.stdout)["peers"]}


def peer_id_of(keyfile: Path) -> str:
    return keys.encode_peer_id(keys.KeyRing(keys.read_keyfile(keyfile)).public_key)


def small_keyfile(path: Path) -> Path:
    keys.write_keyfile(path, keys.generate(shards_total=3, shards_needed=2))
    return path


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., list[Peer]]]:
    """Starts `fluidfs serve` peers by name (each with *extra* options), all at once;
    every one is killed at teardown."""
    made: list[Peer] = []

    def start(*names: str, extra: tuple[str, ...] | list[str] = (),
              extra_for: dict[str, list[str]] | None = None) -> list[Peer]:
        """*extra* options for every one; *extra_for* further ones by name."""
        peers = [Peer(tmp_path, name, extra=[*extra, *(extra_for or {}).get(name, [])])
                 for name in names]
        made.extend(peers)
        return start_all(peers)

    yield start
    for peer in made:
        peer.kill()


def admit(user_key: Path, *providers: Peer) -> str:
    """Admit the user of *user_key* at each of *providers* (1 GiB); its peer id."""
    user_id = peer_id_of(user_key)
    for provider in providers:
        result = run_cli("provider", "add", user_id, "--quota", "1G",
                         "--state-dir", str(provider.state))
        assert result.returncode == 0, result.stderr
    return user_id


def mount_partner(tmp_path: Path, make_mount, hosts: list[Peer], tolerance: float = 60):
    """X: another user, storing with *hosts* and (once it proposes) U, auditing every
    0.5 s and ending an agreement after *tolerance* seconds of failing audits."""
    x = make_mount("x", key=small_keyfile(tmp_path / "x.key"), extra=[
        "--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "1G",
        "--audit-interval", "0.5", "--tolerance", str(tolerance), "--no-web",
        *[f"--peer={h.addr}" for h in hosts]])
    x.mount()
    return x


def user_options(x) -> list[str]:
    """U's mount options, X its only peer (a provider option added by the caller)."""
    x_addr = (x.state / "listen").read_text().strip()
    return ["--listen", "127.0.0.1:0", "--donate", "60M", "--no-web", f"--peer={x_addr}"]


def at(provider: Peer) -> str:
    """The ``--provider`` option naming *provider*."""
    return f"--provider={provider.peer_id}@{provider.addr}"


def wait_for_agreement(x, user_id: str) -> None:
    wait_for(lambda: peer_rows(x.state).get(user_id, {}).get("active"), 60,
             "X's agreement with U")


def write_synced(x, data: bytes) -> None:
    """Write *data* as X's file and wait until it is stored with X's partners."""
    (x.path / "file").write_bytes(data)
    synced(x)


def synced(mount) -> None:
    """Wait until everything *mount* wrote is stored with its partners."""
    result = run_cli("sync", "--state-dir", str(mount.state), "--timeout", "120")
    assert result.returncode == 0, result.stderr + mount.log()


def copies_by_peer(mount) -> dict[str, dict[str, int]]:
    """`fluidfs check --read-data` on *mount*: every shard copy of every file fetched from
    its holder and verified; asserts that all were good, returns the counts per peer id."""
    result = run_cli("check", "--read-data", "--json", "--state-dir", str(mount.state))
    assert result.returncode == 0, result.stdout + result.stderr + mount.log()
    return json.loads(result.stdout)["copies_by_peer"]


def assert_holds_no_secret(state: Path, plaintext: bytes, keyfiles: list[Path]) -> None:
    """No file under *state* holds a piece of *plaintext* or any key of *keyfiles*."""
    secrets = [plaintext[i : i + 64] for i in range(0, len(plaintext), 64 * 1024)]
    for path in keyfiles:
        ring = keys.KeyRing(keys.read_keyfile(path))
        secrets += [ring.keyfile.root, ring.metadata_key, ring.wrap_key, ring.dedup_key]
    for path in state.rglob("*"):
        if path.is_file() and not path.is_socket():
            content = path.read_bytes()
            assert not any(secret in content for secret in secrets), path


def test_the_provider_keeps_an_offline_users_promises(tmp_path: Path, make_mount, serve):
    """Issue 13's first check, to the letter. U has provider P and 12 `serve` peers holding
    its own data; X stores with two of them and U (U's side at P). U unmounts and stays
    away for three times X's tolerance. All through it X's audits of U pass, X's `check
    --read-data` fetches every copy of its shards on U's side (from P) and finds them good,
    U's trust at X never falls below its value when U left, and X's agreement with U never
    fails or ends. Then X reads its files with its cache dropped and one of its hosts
    dead: two of the three shards are needed, one of them U's, served by P.
    Fails with P killed as U leaves: X's first check finds U's copies missing (exit 3)."""
    [provider, *hosts] = serve("provider", *(f"h{i:02d}" for i in range(HOSTS)),
                               extra_for={"provider": ["--provider"]})
    user_key = tmp_path / "u.key"
    # N=12: each block of U's spans 12 peers. K=2: a fresh U that knows only X (and P)
    # can settle that no backup exists yet (max(K, keyfile entries) answers), as a real
    # first mount does, before it takes its writer lease.
    keys.write_keyfile(user_key, keys.generate(shards_total=12, shards_needed=2))
    user_id = admit(user_key, provider)
    # X stores with H0, H1 and (once U proposes) U; N=3 puts one shard of every block on
    # each. U meets its other hosts only once X's files are placed: X's discovery learns
    # U's peers from U, and X's files could otherwise be spread over them instead.
    x = mount_partner(tmp_path, make_mount, hosts[:2], tolerance=TOLERANCE)
    u = make_mount("u", key=user_key, extra=[*user_options(x), at(provider)])
    u.mount()
    wait_for_agreement(x, user_id)
    u_status = wait_for(lambda: (s := status(u.state))["provider"]["reachable"]
                        and s["provider"]["quota"] is not None and s,
                        30, "U's status showing its provider")
    assert u_status["provider"]["id"] == provider.peer_id
    assert u_status["provider"]["reservations"] >= 1
    assert u_status["provider"]["quota"] == 1 << 30
    shown = run_cli("status", "--state-dir", str(u.state)).stdout
    assert f"provider:    {provider.peer_id[:18]}" in shown and ": reachable;" in shown
    assert "our quota there 1.0G" in shown
    listed = run_cli("provider", "list", "--json", "--state-dir", str(provider.state))
    customers = json.loads(listed.stdout)["customers"]
    assert [c["id"] for c in customers] == [user_id] and customers[0]["reservations"] >= 1
    # `fluidfs peers` says where each side is held: U's side at P (on U), and on X
    # that U's side of their agreement is at P.
    x_id = peer_id_of(x.keyfile)
    assert peer_rows(u.state)[x_id]["held_at"] == provider.peer_id
    assert peer_rows(x.state)[user_id]["their_side_at"] == provider.peer_id
    table = run_cli("peers", "--state-dir", str(u.state)).stdout
    assert "PROVIDER" in table and f"ours at {provider.peer_id[:12]}…" in table

    files = {f"f{i}": os.urandom(256 * 1024) for i in range(8)}  # a block each
    for name, data in files.items():
        (x.path / name).write_bytes(data)
    synced(x)
    serving = status(provider.state)["serving_as_provider"]
    assert serving["customers"] == 1 and serving["held_bytes"] > 0  # U's side
    assert "provider for: 1 customers" in run_cli(
        "status", "--state-dir", str(provider.state)).stdout
    # ... and on P, its customers with their reservations and bytes reserved and held.
    shown = run_cli("peers", "--json", "--state-dir", str(provider.state))
    customers = json.loads(shown.stdout)["customers"]
    assert [c["id"] for c in customers] == [user_id]
    assert customers[0]["reservations"] >= 1 and customers[0]["held_bytes"] > 0
    assert customers[0]["quota"] == 1 << 30
    table = run_cli("peers", "--state-dir", str(provider.state)).stdout
    assert "serving as a storage provider for 1 customers" in table
    assert f"{user_id[:18]}…" in table

    # U meets its 12 hosts and spreads its own data over them; its side of each
    # agreement is at P too. (`fluidfs peers add`'s request, all at once: twelve
    # command processes cost more than the adds.)
    with ThreadPoolExecutor(HOSTS) as pool:
        added = list(pool.map(lambda h: control.call(u.state / "control.sock", "add_peer",
                                                     addr=h.addr), hosts))
    assert all(reply["agreement"] for reply in added), added
    own = os.urandom(1 << 20)
    (u.path / "own").write_bytes(own)
    synced(u)
    rows = peer_rows(u.state)
    host_ids = {h.peer_id for h in hosts}
    assert len({i for i in host_ids if rows[i]["they_use"] > 0}) >= HOSTS - 1  # N=12 of 13
    assert all(rows[i]["held_at"] == provider.peer_id for i in [*host_ids, x_id])
    assert_holds_no_secret(provider.state, b"".join([own, *files.values()]),
                           [user_key, x.keyfile])
    on_u_side = copies_by_peer(x)[user_id]["good"]  # X's shards U holds (at P)
    assert on_u_side > 0

    u.unmount()  # U goes away
    left = peer_rows(x.state)[user_id]
    away_until = time.monotonic() + 3 * TOLERANCE
    checks = 0
    while time.monotonic() < away_until or checks < 4:
        # Every copy X placed on U's side is fetched (from P) and verified: none is
        # missing or corrupt (the check would exit 3), and none moved away.
        assert copies_by_peer(x)[user_id]["good"] >= on_u_side
        checks += 1
        row = peer_rows(x.state)[user_id]
        assert row["active"], "X ended its agreement with the offline user"
        assert row["failing_since"] is None and row["audits_failed"] == 0, row
        assert row["trust"] >= left["trust"], (row, left)
        time.sleep(TOLERANCE / 4)
    assert peer_rows(x.state)[user_id]["audits_passed"] > left["audits_passed"]  # by P
    # What X's user sees: its files, read with no cache and H0 gone, so K=2 of 3 takes
    # U's shard of each block from P. H0 dies after X's remount: X's writer lease is
    # held by H0, H1 and U's side, and no mount may take it without a majority.
    x.unmount()
    drop_cache(x.state)
    x.mount()
    hosts[0].kill()
    for name, data in files.items():
        assert (x.path / name).read_bytes() == data, name
    row = peer_rows(x.state)[user_id]
    assert row["active"] and row["failing_since"] is None and row["audits_failed"] == 0, row
    assert row["trust"] >= left["trust"], (row, left)


def test_a_user_takes_its_side_home_when_the_provider_vanishes(tmp_path: Path, make_mount, serve):
    """P is killed for good while U is online: after half U's tolerance U renews its
    agreement with X without store_at, status says so, and X's agreement with U stays
    (X's audits reach U again; the shards lost with P are rebuilt by X's repair).
    X accepts the renewal on the terms it had granted even though its failed audits of
    U (at the dead P) lowered its trust in U."""
    [provider] = serve("provider", extra=["--provider"])
    hosts = serve("s0", "s1")
    user_key = small_keyfile(tmp_path / "u.key")
    user_id = admit(user_key, provider)
    x = mount_partner(tmp_path, make_mount, hosts)
    u = make_mount("u", key=user_key,
                   extra=[*user_options(x), "--tolerance", "2", at(provider)])
    u.mount()
    wait_for_agreement(x, user_id)
    write_synced(x, os.urandom(256 * 1024))

    provider.kill()
    home = wait_for(lambda: (s := status(u.state))["provider"]["taken_back"] and s, 60,
                    "U taking its side back home")
    assert home["provider"]["reachable"] is False
    assert any(w["kind"] == "provider" and "brought back" in w["text"]
               for w in home["overview"]["warnings"])
    assert "NOT REACHABLE" in run_cli("status", "--state-dir", str(u.state)).stdout
    # X's audits of U reach U again: one passes once X's repair has put back the
    # shard lost with P (or moved it), and the agreement never ended.
    wait_for(lambda: (r := peer_rows(x.state)[user_id])["failing_since"] is None
             and r["audits_passed"] > 0 and status(x.state)["under_replicated"] == 0,
             90, "X's audits of U passing again and its blocks fully placed")
    assert peer_rows(x.state)[user_id]["active"]


def test_a_user_switches_providers_with_no_agreement_broken(tmp_path: Path, make_mount, serve):
    """U's side of its agreement with X is at P; U remounts with --provider P2: its side
    is handed over to P2 (X's agreement with U stays), P removes its reservation, and with
    U away and P killed X's audits of U pass, answered by P2."""
    old, new = serve("provider", "provider2", extra=["--provider"])
    hosts = serve("s0", "s1")
    user_key = small_keyfile(tmp_path / "u.key")
    user_id = admit(user_key, old, new)
    x = mount_partner(tmp_path, make_mount, hosts)
    base = user_options(x)
    u = make_mount("u", key=user_key, extra=[*base, at(old)])
    u.mount()
    wait_for_agreement(x, user_id)
    write_synced(x, os.urandom(3 * 256 * 1024))
    assert status(old.state)["serving_as_provider"]["held_bytes"] > 0
    u.unmount()

    u.extra = [*base, at(new)]
    u.mount()
    wait_for(lambda: status(old.state)["serving_as_provider"]["reservations"] == 0
             and status(new.state)["serving_as_provider"]["held_bytes"] > 0, 60,
             "U's side handed over from P to P2")
    moved = status(u.state)["provider"]
    assert moved["id"] == new.peer_id and moved["reservations"] >= 1
    assert not moved["moving_from"]
    u.unmount()
    old.kill()  # neither U nor P answers now: X's audits of U pass at P2 alone
    passed = peer_rows(x.state)[user_id]["audits_passed"]
    wait_for(lambda: peer_rows(x.state)[user_id]["audits_passed"] > passed, 30,
             "X's audits of U passing at P2")
    row = peer_rows(x.state)[user_id]
    assert row["active"] and row["failing_since"] is None


def test_a_user_mounting_without_its_provider_brings_its_side_home(
        tmp_path: Path, make_mount, serve):
    """U's side of its agreement with X is at P; U remounts without --provider: its side
    comes home (X's shards copied from P, the agreement renewed without store_at, P's
    reservation removed), and with P killed X's audits of U pass, answered by U."""
    [provider] = serve("provider", extra=["--provider"])
    hosts = serve("s0", "s1")
    user_key = small_keyfile(tmp_path / "u.key")
    user_id = admit(user_key, provider)
    x = mount_partner(tmp_path, make_mount, hosts)
    base = user_options(x)
    u = make_mount("u", key=user_key, extra=[*base, at(provider)])
    u.mount()
    wait_for_agreement(x, user_id)
    write_synced(x, os.urandom(3 * 256 * 1024))
    held = status(provider.state)["serving_as_provider"]["held_bytes"]
    assert held > 0
    u.unmount()

    u.extra = base  # no --provider
    u.mount()
    wait_for(lambda: status(provider.state)["serving_as_provider"]["reservations"] == 0
             and peer_rows(x.state)[user_id]["their_side_at"] is None, 60,
             "U's side brought home from P")
    x_id = peer_id_of(x.keyfile)
    row = peer_rows(u.state)[x_id]
    assert row["held_at"] is None and row["we_use"] >= held  # every shard came home
    assert "provider" not in status(u.state)
    provider.kill()  # only U answers for its side now
    passed = peer_rows(x.state)[user_id]["audits_passed"]
    wait_for(lambda: peer_rows(x.state)[user_id]["audits_passed"] > passed, 30,
             "X's audits of U passing at U")
    row = peer_rows(x.state)[user_id]
    assert row["active"] and row["failing_since"] is None and row["audits_failed"] == 0
    u.unmount()
    u.mount()  # the state forgot P: nothing to bring home any more
    assert "leaving_provider" not in status(u.state)


def test_a_partners_fresh_machine_reads_the_users_side_at_its_provider(
        tmp_path: Path, make_mount, serve):
    """X's shards are on S0, S1 and U, whose side is at P (K=2 of N=3); U and S0 are
    away. X's fresh machine (its exported keyfile, a new state directory) learns from
    X's root record that U's side is at P: it takes X's writer lease on S1 and U's side
    at P (2 of 3) and reads the file from S1's shard and U's at P. Fails before: the
    fresh machine asks U itself, finds no majority for the lease and no second shard."""
    [provider] = serve("provider", extra=["--provider"])
    hosts = serve("s0", "s1")
    user_key = small_keyfile(tmp_path / "u.key")
    user_id = admit(user_key, provider)
    x_extra = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "1G",
               "--no-web", "--lease-renew", "1"]
    x = make_mount("x", key=small_keyfile(tmp_path / "x.key"), extra=[
        *x_extra, *[f"--peer={h.addr}" for h in hosts]])
    x.mount()
    u = make_mount("u", key=user_key, extra=[*user_options(x), at(provider)])
    u.mount()
    wait_for_agreement(x, user_id)
    # X's writer lease re-forms toward its partners (S0, S1, U) while it renews: U's
    # copy is at P (records at the provider); two renewals later the set is S0, S1, U.
    wait_for(lambda: list((provider.state / "reserved-records").glob("*.lease")), 60,
             "X's lease record kept for U at P")
    time.sleep(3 * 1.0)
    data = os.urandom(3 * 256 * 1024)
    write_synced(x, data)
    exported = tmp_path / "x-exported.key"
    result = run_cli("key", "export", "--with-peers", "--keyfile", str(x.keyfile),
                     "--state-dir", str(x.state))
    assert result.returncode == 0, result.stderr
    exported.write_text(result.stdout)
    os.chmod(exported, 0o600)
    x.unmount()
    u.unmount()
    hosts[0].kill()

    fresh = make_mount("fresh", key=exported, extra=x_extra)
    fresh.mount()
    assert (fresh.path / "file").read_bytes() == data


def test_a_user_mounting_with_a_provider_moves_its_side_held_at_home_there(
        tmp_path: Path, make_mount, serve):
    """U's side of its agreement with X is at home (U mounted without a provider); U
    remounts with --provider P: its side moves to P (X's shards copied there, the
    agreement renewed with store_at naming P, U's own copies dropped), and with U
    unmounted X's audits of U pass, answered by P. Fails before: the side stays at U."""
    [provider] = serve("provider", extra=["--provider"])
    hosts = serve("s0", "s1")
    user_key = small_keyfile(tmp_path / "u.key")
    user_id = admit(user_key, provider)
    x = mount_partner(tmp_path, make_mount, hosts)
    base = user_options(x)
    u = make_mount("u", key=user_key, extra=base)  # no --provider: held at home
    u.mount()
    wait_for_agreement(x, user_id)
    write_synced(x, os.urandom(3 * 256 * 1024))
    x_id = peer_id_of(x.keyfile)
    held = peer_rows(u.state)[x_id]["we_use"]
    assert held > 0 and peer_rows(x.state)[user_id]["their_side_at"] is None
    u.unmount()

    u.extra = [*base, at(provider)]
    u.mount()
    wait_for(lambda: peer_rows(x.state)[user_id]["their_side_at"] == provider.peer_id
             and peer_rows(u.state)[x_id]["we_use"] == 0, 60, "U's side moved to P")
    assert status(provider.state)["serving_as_provider"]["held_bytes"] >= held
    assert peer_rows(u.state)[x_id]["held_at"] == provider.peer_id
    u.unmount()  # only P answers for U's side now
    before = peer_rows(x.state)[user_id]  # audits failed while U was away at home
    wait_for(lambda: peer_rows(x.state)[user_id]["audits_passed"]
             > before["audits_passed"] + 2, 30, "X's audits of U passing at P")
    row = peer_rows(x.state)[user_id]
    assert row["active"] and row["failing_since"] is None
    assert row["audits_failed"] == before["audits_failed"]


def test_the_provider_refuses_shards_outside_a_live_reservation(serve):
    """Issue 13's third check with a real provider process: P refuses a shard for U from a
    peer U reserved nothing for, one past the reservation's size, and one after U removed
    the reservation (whose shards P still serves for its keep period); a stranger cannot
    reserve. The test plays U, X and a stranger Y over TCP, each with its own key.
    (That P never holds a key or plaintext of U's: the first test scans its state.)"""
    [provider] = serve("provider", extra=["--provider"])
    u, x, y = (nacl.signing.SigningKey.generate() for _ in range(3))
    u_key, x_key = bytes(u.verify_key), bytes(x.verify_key)
    admitted = run_cli("provider", "add", keys.encode_peer_id(u_key), "--quota", "1M",
                       "--state-dir", str(provider.state))
    assert admitted.returncode == 0, admitted.stderr
    host, port = endpoint(provider)

    async def refused(conn, op: str, args: dict) -> str:
        with pytest.raises(RpcError) as err:
            await conn.call(op, args)
        return err.value.code

    async def main() -> None:
        async with (open_rpc(host, port, u, provider.public_key) as as_u,
                    open_rpc(host, port, x, provider.public_key) as as_x,
                    open_rpc(host, port, y, provider.public_key) as as_y):
            first, second = random_shard(1000), random_shard(1000)
            assert await refused(as_y, "Reserve", {"peer": x_key, "size": 2000}) == "refused"
            assert await refused(as_x, "StoreShard",
                                 {"shards": [first], "for": u_key}) == "no_agreement"
            assert await as_u.call("Reserve", {"peer": x_key, "size": 1500}) == {"size": 1500}
            assert await refused(as_y, "StoreShard",
                                 {"shards": [first], "for": u_key}) == "no_agreement"
            # Past the reservation's size: the second shard is refused.
            stored = await as_x.call("StoreShard", {"shards": [first, second], "for": u_key})
            assert stored == {"stored": [first["id"]],
                              "refused": [{"id": second["id"], "code": "over_quota"}]}
            assert await as_u.call("Unreserve", {"peer": x_key}) == {"removed": True}
            assert await refused(as_x, "StoreShard",
                                 {"shards": [second], "for": u_key}) == "no_agreement"
            got = await as_x.call("RetrieveShard", {"id": first["id"], "for": u_key})
            assert got["data"] == first["data"]  # kept for the keep period
            assert await as_y.call("Ping", {})  # P serves on

    trio.run(main)


def test_a_customer_joins_a_provider_with_a_one_time_code(tmp_path: Path, serve):
    """The operator makes a code at P (`provider invite`); U redeems it with `provider
    join` and is a customer with the code's quota. The same code again (from V), a forged
    one (a secret P never made) and one naming another id at P's address admit nobody."""
    [provider] = serve("provider", extra=["--provider"])
    made = run_cli("provider", "invite", "--quota", "1G", "--keyfile", str(provider.keyfile),
                   "--state-dir", str(provider.state))
    assert made.returncode == 0, made.stderr
    code = made.stdout.strip()
    user_key, other_key = small_keyfile(tmp_path / "u.key"), small_keyfile(tmp_path / "v.key")

    joined = run_cli("provider", "join", code, "--keyfile", str(user_key))
    assert joined.returncode == 0, joined.stderr
    assert f"--provider {provider.peer_id}@{provider.addr}" in joined.stdout
    again = run_cli("provider", "join", code, "--keyfile", str(other_key))
    assert again.returncode == 1 and "refused" in again.stderr, again.stderr
    forged = ProviderCode(os.urandom(16), provider.public_key, provider.addr)
    refused = run_cli("provider", "join", str(forged), "--keyfile", str(other_key))
    assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr
    elsewhere = ProviderCode(read_code(code).secret, os.urandom(32), provider.addr)
    unmet = run_cli("provider", "join", str(elsewhere), "--keyfile", str(other_key))
    assert unmet.returncode == 1 and "could not reach" in unmet.stderr, unmet.stderr

    listed = run_cli("provider", "list", "--json", "--state-dir", str(provider.state))
    books = json.loads(listed.stdout)
    assert [(c["id"], c["quota"]) for c in books["customers"]] == [
        (peer_id_of(user_key), 1 << 30)]
    assert books["invitations"] == []
