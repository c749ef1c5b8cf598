"""The KServe v2 protocol's messages and service, generated from Triton's .proto files (their
names and packages as Triton's, so that any KServe v2 client speaks to the server).

protobuf keeps one registry of .proto files per process, and tritonclient registers the
same file names: the two cannot share a process. Said here, in words, where tritonclient
came first (protobuf's own error is a page of descriptor bytes)."""

from google.protobuf import descriptor_pool

try:
    descriptor_pool.Default().FindFileByName("model_config.proto")
except KeyError:
    pass  # not registered yet: ours will be
else:
    raise ImportError(
        "quantgate's KServe v2 protos cannot be loaded in a process that has loaded "
        "tritonclient's (both register model_config.proto and grpc_service.proto with "
        "protobuf): use quantgate.serve.Client or tritonclient in a process, not both"
    )
