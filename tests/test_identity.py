"""Per-client identity: sessions and v2 sequences belong to the client that opened them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rnnserve.client import Client, RnnServeError
from rnnserve.doors.identity import Identities, parse_tokens
from tests.conftest import RunningServer, make_config, running

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


def code(call, *args, **kwargs) -> str:
    with pytest.raises(RnnServeError) as err:
        call(*args, **kwargs)
    return err.value.code.name


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# client token\nalice {ALICE}\n\nbob {BOB}  # the other one\n")
    return path


def test_sessions_belong_to_their_client(tokens_file: Path) -> None:
    with (
        running(auth_tokens_file=str(tokens_file), max_sessions_per_client=2) as srv,
        srv.client(token=ALICE) as alice,
        srv.client(token=BOB) as bob,
    ):
        mine = alice.open_session("echo").session_id
        alice.step(mine, [1.0])
        for call in (bob.step, bob.snapshot, bob.reset, bob.close_session):
            args = (mine, [1.0]) if call == bob.step else (mine,)
            assert code(call, *args) == "NOT_FOUND"
        with bob.stream() as stream:
            assert code(stream.resume, mine) == "NOT_FOUND"
        batch = bob.step_many([mine], np.ones((1, 1, 1), np.float32))
        assert batch.errors[0].code.name == "NOT_FOUND"
        assert alice.snapshot(mine)["h0"].shape == (4,)  # untouched by bob
        alice.close_session(mine)
        assert code(bob.step, mine, [1.0]) == "NOT_FOUND"  # not even "closed" for bob
        assert code(alice.step, mine, [1.0]) == "FAILED_PRECONDITION"
        alice.open_session("echo"), alice.open_session("echo")
        assert code(alice.open_session, "echo") == "RESOURCE_EXHAUSTED"  # per-client quota
        bob.open_session("echo")  # bob's quota is his own
        assert code(srv.client(token="wrong-token-0123456789").list_models) == "UNAUTHENTICATED"
        sample = srv.server.engine.metrics.registry.get_sample_value
        assert (
            sample(
                "rnnserve_requests_total",
                {
                    "model": "echo",
                    "version": "1",
                    "method": "Step",
                    "code": "OK",
                    "client": "alice",
                },
            )
            == 1
        )


def test_v2_sequences_are_per_client(tokens_file: Path) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    with running(auth_tokens_file=str(tokens_file)) as srv:

        def infer(token: str, x: np.ndarray, **flags) -> np.ndarray:
            client = grpcclient.InferenceServerClient(url=srv.address)
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            try:
                return client.infer(
                    "echo",
                    [tensor],
                    sequence_id=1,
                    headers={"authorization": f"Bearer {token}"},
                    **flags,
                ).as_numpy("y")
            finally:
                client.close()

        x = np.ones((1, 3, 1), np.float32)
        first = infer(ALICE, x, sequence_start=True)
        with pytest.raises(InferenceServerException, match="not open"):
            infer(BOB, x)  # same sequence id, another client: not alice's sequence
        infer(BOB, x * 0, sequence_start=True)  # bob's own sequence 1
        rest = infer(ALICE, x, sequence_end=True)
        with Client(srv.address, token=ALICE) as client:
            whole = client.predict("echo", np.ones((1, 6, 1), np.float32)).y
        assert np.allclose(np.concatenate([first, rest], axis=1), whole, atol=1e-6)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("alice short\n", "shorter than"),
        ("alice a-long-enough-token-1 extra\n", "expected 'client-name token'"),
        (f"alice {ALICE}\nalice {BOB}\n", "appears twice"),
        ("bad/name a-long-enough-token-1\n", "client name"),
        ("# nothing\n", "no 'client-name token' lines"),
    ],
)
def test_tokens_file_errors_name_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        parse_tokens(path)


def test_single_token_is_the_default_client() -> None:
    identities = Identities.load("a-single-token", "")
    assert identities.client([("authorization", "Bearer a-single-token")]) == "default"


@pytest.mark.parametrize(
    "bad_start, reason",
    [
        (np.full((1, 2, 1), np.nan, np.float32), "NaN"),
        (np.zeros((1, 600, 1), np.float32), "message limit"),  # answer 4,800 bytes > 4,096
    ],
)
def test_a_failed_v2_sequence_start_leaves_the_running_sequence_alone(
    bad_start: np.ndarray, reason: str
) -> None:
    with running(max_message_bytes=4096) as server:
        _restart_fails_and_sequence_continues(server, bad_start, reason)


def _restart_fails_and_sequence_continues(
    server: RunningServer, bad_start: np.ndarray, reason: str
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    def infer(x: np.ndarray, **flags) -> np.ndarray:
        client = grpcclient.InferenceServerClient(url=server.address)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        try:
            return client.infer("echo", [tensor], sequence_id="restart-me", **flags).as_numpy("y")
        finally:
            client.close()

    x = np.random.default_rng(2).integers(0, 2, (1, 6, 1)).astype(np.float32)
    first = infer(x[:, :3], sequence_start=True)
    with pytest.raises(InferenceServerException, match=reason):
        infer(bad_start, sequence_start=True)
    rest = infer(x[:, 3:], sequence_end=True)  # the earlier sequence, state intact
    with Client(server.address) as client:
        whole = client.predict("echo", x).y
    assert np.max(np.abs(np.concatenate([first, rest], axis=1) - whole)) <= 1e-5


def test_a_rotated_tokens_file_takes_effect_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens rotate without a restart, which would drop every session; alice's sessions
    stay hers under her new token, and a file that does not parse changes nothing."""
    import os
    import time

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\n")
    fresh = "alice-new-token-0123456789"

    def until(predicate) -> None:
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def accepted(token: str) -> bool:
        with srv.client(token=token) as client:
            try:
                client.list_models()
                return True
            except RnnServeError as exc:
                assert exc.code.name == "UNAUTHENTICATED"
                return False

    with running(auth_tokens_file=str(tokens)) as srv:
        with srv.client(token=ALICE) as alice:
            mine = alice.open_session("echo").session_id
            alice.step(mine, [1.0])
        swap = tmp_path / "tokens.new"  # as a Kubernetes Secret rotates: a new file, renamed
        swap.write_text(f"alice {fresh}\nbob {BOB}\n")
        os.replace(swap, tokens)
        until(lambda: accepted(fresh))
        assert not accepted(ALICE) and accepted(BOB)
        with srv.client(token=fresh) as alice:
            assert alice.step(mine, [1.0]).shape == (1, 2)  # still alice's session
        tokens.write_text("alice short\n")  # malformed: the tokens in force stay
        until(lambda: any("not reloaded" in r.getMessage() for r in caplog.records))
        assert accepted(fresh) and accepted(BOB)


def open_chosen(server: RunningServer, token: str, session_id: str) -> None:
    """OpenSession under an id the client chose (the Python client always picks a random one)."""
    import grpc

    from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc

    with grpc.insecure_channel(server.address) as channel:
        opened = rpc.InferenceStub(channel).OpenSession(
            pb.OpenSessionRequest(model="echo", session_id=session_id),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    assert opened.session.session_id == session_id


def test_session_ids_are_each_clients_own(tokens_file: Path) -> None:
    """No client can name, block or probe another's session: the same chosen id is two
    sessions for two clients (it answered ALREADY_EXISTS, telling bob alice held it), and a
    v2 sequence's derived id pre-opened natively by another client blocks nothing (its
    sequence_start got ALREADY_EXISTS)."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from rnnserve.doors.kserve_dataplane import sequence_session_id

    chosen = "c0ffee" * 5 + "00"
    with (
        running(auth_tokens_file=str(tokens_file)) as srv,
        srv.client(token=ALICE) as alice,
        srv.client(token=BOB) as bob,
    ):
        open_chosen(srv, ALICE, chosen)
        alice.step(chosen, [1.0])
        before = alice.snapshot(chosen)
        open_chosen(srv, BOB, chosen)  # free for bob: alice's ids are hers
        bob.step(chosen, [5.0])
        after = alice.snapshot(chosen)
        assert all(np.array_equal(before[k], after[k]) for k in before)  # untouched by bob

        squatted = sequence_session_id("bob", "echo", 7)
        open_chosen(srv, ALICE, squatted)  # alice squats bob's sequence 7
        x = np.random.default_rng(2).uniform(-1, 1, (1, 6, 1)).astype(np.float32)
        client = grpcclient.InferenceServerClient(url=srv.address)
        try:

            def infer(part: np.ndarray, **flags) -> np.ndarray:
                tensor = grpcclient.InferInput("x", list(part.shape), "FP32")
                tensor.set_data_from_numpy(part)
                return client.infer(
                    "echo",
                    [tensor],
                    sequence_id=7,
                    headers={"authorization": f"Bearer {BOB}"},
                    **flags,
                ).as_numpy("y")

            got = np.concatenate(
                [infer(x[:, :2], sequence_start=True), infer(x[:, 2:], sequence_end=True)], axis=1
            )
        finally:
            client.close()
        assert np.max(np.abs(got - bob.predict("echo", x).y)) <= 1e-6


def test_the_same_id_of_two_clients_moves_between_replicas_as_two_sessions(
    tokens_file: Path, redis_url: str
) -> None:
    """Parked in the shared store under (client, id), two clients' sessions of one id each
    come back as their own."""
    chosen = "5e55" * 8
    a = RunningServer(make_config(auth_tokens_file=str(tokens_file), state_store=redis_url))
    with a.client(token=ALICE) as alice, a.client(token=BOB) as bob:
        open_chosen(a, ALICE, chosen)
        open_chosen(a, BOB, chosen)
        alice.step(chosen, [1.0])
        bob.step(chosen, [-3.0])
        states = {"alice": alice.snapshot(chosen), "bob": bob.snapshot(chosen)}
    a.stop()  # drain: both parked
    with (
        running(auth_tokens_file=str(tokens_file), state_store=redis_url) as b,
        b.client(token=ALICE) as alice,
        b.client(token=BOB) as bob,
    ):
        for name, client in (("alice", alice), ("bob", bob)):
            moved = client.snapshot(chosen)
            assert all(np.array_equal(states[name][k], moved[k]) for k in moved), name


def test_another_clients_live_id_on_another_replica_answers_like_an_unknown_one(
    tokens_file: Path, redis_url: str
) -> None:
    """A replica asked for a session it does not hold asks the holder only for the caller's
    own sessions: bob naming alice's live id got NOT_FOUND after the whole handoff wait (a
    random id at once), which told him the id was live somewhere."""
    import time

    with (
        running(auth_tokens_file=str(tokens_file), state_store=redis_url) as a,
        running(auth_tokens_file=str(tokens_file), state_store=redis_url, handoff_wait=5.0) as b,
        a.client(token=ALICE) as alice,
        b.client(token=BOB) as bob,
    ):
        hers = alice.open_session("echo").session_id
        alice.step(hers, [1.0])
        time.sleep(0.5)  # her session is recorded as held by a (in the background)
        for session_id in (hers, "0123" * 8):
            started = time.monotonic()
            assert code(bob.step, session_id, [1.0]) == "NOT_FOUND"
            assert time.monotonic() - started < 2.5  # no wait for a release that never comes
        assert alice.step(hers, [1.0]).shape == (1, 2)  # still on a, still hers
