"""Server reflection, both protocol versions (grpcurl speaks v1alpha, buf v1):
the services and their descriptors are discoverable without the .proto files."""

from grpc_reflection.v1alpha import reflection_pb2

import grpc


# The v1 and v1alpha messages are identical on the wire: one set of classes
# serves both method paths.
PATHS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}


def ask(channel, version, request):
    call = channel.stream_stream(
        PATHS[version],
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter([request]), timeout=10))[0]


def test_reflection_lists_and_describes_the_services(channel):
    for version in PATHS:
        listed = ask(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        # what this process serves, and nothing else (not the worker API)
        assert names - {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} \
            == {"remask.v1.Generation", "grpc.health.v1.Health"}, (version, names)
        described = ask(channel, version,
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol="remask.v1.Generation"))
        files = described.file_descriptor_response.file_descriptor_proto
        assert files, version
        assert any(b"GenerateStream" in f for f in files), version
