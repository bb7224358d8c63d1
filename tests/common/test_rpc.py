"""The service guard over real mTLS: per-RPC allow-lists, decode failures, one status map."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitgate.common import rpc, tls
from jitgate.common.errors import PermissionDenied
from jitgate.devstack.pki import DevPki
from jitgate.v1 import policy_pb2, policy_pb2_grpc
from tests.support import channel, running

ACL = {"/jitgate.v1.Policy/Decide": frozenset({"issuer"})}


class _Probe(policy_pb2_grpc.PolicyServicer):
    async def Decide(
        self, request: policy_pb2.DecideRequest, context: rpc.ServicerContext
    ) -> policy_pb2.Decision:
        if request.connection == "denied":
            raise PermissionDenied("NO_BINDING", "no binding")
        if request.connection == "bug":
            raise RuntimeError("a secret the caller must not see")
        return policy_pb2.Decision(subject=rpc.caller.get())

    async def Revoke(
        self, request: policy_pb2.RevokeRequest, context: rpc.ServicerContext
    ) -> policy_pb2.RevokeResponse:
        return policy_pb2.RevokeResponse()


@pytest.fixture
async def port(dev_pki: DevPki) -> AsyncIterator[int]:
    def register(server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServicer_to_server(_Probe(), server)

    async with running(dev_pki, "policy", register, ACL) as bound:
        yield bound


async def _decide(dev: DevPki, caller: str, port: int, connection: str) -> policy_pb2.Decision:
    async with channel(dev, caller, port, "policy") as ch:
        return await policy_pb2_grpc.PolicyStub(ch).Decide(
            policy_pb2.DecideRequest(connection=connection), timeout=5
        )


async def test_an_allowed_caller_is_named_by_its_certificate(dev_pki: DevPki, port: int) -> None:
    decision = await _decide(dev_pki, "issuer", port, "x")
    assert decision.subject == "issuer"


@pytest.mark.parametrize("caller", ["verifier", "proxy", "auditor", "audit"])
async def test_a_caller_not_on_the_list_is_denied(dev_pki: DevPki, port: int, caller: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(dev_pki, caller, port, "x")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == "caller not allowed"


async def test_a_method_missing_from_the_list_is_denied_to_everyone(
    dev_pki: DevPki, port: int
) -> None:
    async with channel(dev_pki, "issuer", port, "policy") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await policy_pb2_grpc.PolicyStub(ch).Revoke(policy_pb2.RevokeRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_certificate_from_another_ca_never_completes_the_handshake(
    dev_pki: DevPki, foreign_pki: DevPki, port: int
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=dev_pki.ca.read_bytes(),
        private_key=foreign_pki.files("issuer").key.read_bytes(),
        certificate_chain=foreign_pki.files("issuer").cert.read_bytes(),
    )
    async with tls.secure_channel(f"127.0.0.1:{port}", credentials, server_name="policy") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await policy_pb2_grpc.PolicyStub(ch).Decide(policy_pb2.DecideRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_no_client_certificate_never_completes_the_handshake(
    dev_pki: DevPki, port: int
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=dev_pki.ca.read_bytes())
    async with tls.secure_channel(f"127.0.0.1:{port}", credentials, server_name="policy") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await policy_pb2_grpc.PolicyStub(ch).Decide(policy_pb2.DecideRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_client_refuses_a_server_with_another_name(dev_pki: DevPki, port: int) -> None:
    async with channel(dev_pki, "issuer", port, "verifier") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await policy_pb2_grpc.PolicyStub(ch).Decide(policy_pb2.DecideRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_undecodable_bytes_are_invalid_argument(dev_pki: DevPki, port: int) -> None:
    async with channel(dev_pki, "issuer", port, "policy") as ch:
        call = ch.unary_unary(
            "/jitgate.v1.Policy/Decide",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"\xff\xff\xff\xff", timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_jitgate_error_maps_to_its_status(dev_pki: DevPki, port: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(dev_pki, "issuer", port, "denied")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == "no binding"


async def test_a_bug_is_internal_and_leaks_nothing(dev_pki: DevPki, port: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(dev_pki, "issuer", port, "bug")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert raised.value.details() == "internal error"


@pytest.mark.parametrize("caller", ["issuer", "operator", "auditor"])
async def test_health_is_open_to_every_workload_of_our_ca(
    dev_pki: DevPki, port: int, caller: str
) -> None:
    async with channel(dev_pki, caller, port, "policy") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
