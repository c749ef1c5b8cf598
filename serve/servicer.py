"""inference.GRPCInferenceService: protobuf in, numpy to the engine, protobuf out.

The servicer converts messages and maps errors to status codes; the engine does the
rest. Status codes follow Triton's:

    malformed request, wrong name/dtype/shape/byte size, batch too large  INVALID_ARGUMENT
    unknown model or version                                              NOT_FOUND
    queue full, warming up, shutting down                                 UNAVAILABLE
    deadline passed before the request ran                                DEADLINE_EXCEEDED
    client cancelled                                                      CANCELLED (by gRPC)
    message over --max-message-bytes                                      RESOURCE_EXHAUSTED (by gRPC)
    ONNX Runtime failed on a valid request                                INTERNAL
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

import grpc

from quantgate import __version__
from quantgate.errors import QuantgateError
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.protos import grpc_service_pb2_grpc as pb_grpc
from quantgate.protos import model_config_pb2 as mc
from quantgate.serve import codec
from quantgate.serve.engine import Engine
from quantgate.serve.errors import InferenceFailed, ModelNotFound, status_of
from quantgate.serve.runtime import CUDA, Model

log = logging.getLogger(__name__)

EXTENSIONS = ("model_configuration", "statistics")
# A call cancelled this close to its deadline is counted as DEADLINE_EXCEEDED: the time
# left is read just before the request's clock starts.
DEADLINE_SLACK_S = 1e-3
PLATFORM = "onnxruntime_onnx"


def _aborts(method):
    """Turn quantgate errors raised by a unary handler into their status codes."""

    @functools.wraps(method)
    async def handler(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except QuantgateError as e:
            await context.abort(status_of(e), str(e))

    return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._engine.ready)

    async def ModelReady(self, request, context):
        try:
            self._engine.model(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._engine.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="quantgate", version=__version__, extensions=EXTENSIONS
        )

    @_aborts
    async def ModelMetadata(self, request, context):
        m = self._engine.model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name,
            versions=self._engine.repository.versions(m.name),
            platform=PLATFORM,
            inputs=[
                tensor(name=t.name, datatype=codec.datatype(t.dtype), shape=t.shape)
                for t in m.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=codec.datatype(t.dtype), shape=t.shape)
                for t in m.outputs
            ],
        )

    @_aborts
    async def ModelConfig(self, request, context):
        m = self._engine.model(request.name, request.version)
        return pb.ModelConfigResponse(config=self._config(m))

    @_aborts
    async def ModelStatistics(self, request, context):
        if request.name:
            m = self._engine.model(request.name, request.version)
            models = (
                [m]
                if request.version
                else [
                    self._engine.model(m.name, v) for v in self._engine.repository.versions(m.name)
                ]
            )
        else:
            models = list(self._engine.repository)
        return pb.ModelStatisticsResponse(
            model_stats=[self._engine.stats[(m.name, m.version)].proto() for m in models]
        )

    async def ModelInfer(self, request, context):
        response, err = await self._infer(request, context.time_remaining())
        if err is not None:
            await context.abort(status_of(err), str(err))
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they can share batches); answers keep request order.

        A failed request is answered in the stream with ``error_message``, as Triton does,
        and the stream stays open. When the stream ends early (the client cancelled, or a
        message could not be read), requests it queued and nobody will read are cancelled.
        """
        answers: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    # The stream's own deadline, if any, cancels the whole call; requests
                    # get none.
                    answers.put_nowait(asyncio.create_task(self._infer(request, None)))
            finally:
                answers.put_nowait(None)  # the answers loop below must never wait forever

        reader = asyncio.create_task(read())
        try:
            while (task := await answers.get()) is not None:
                response, err = await task
                if err is None:
                    yield codec.stream_response(response)
                else:
                    yield pb.ModelStreamInferResponse(
                        error_message=f"{status_of(err).name}: {err}",
                        infer_response=pb.ModelInferResponse(id=response.id),
                    )
            await reader  # a message that could not be read ends the call with its error
        finally:
            reader.cancel()
            while not answers.empty():
                if (task := answers.get_nowait()) is not None:
                    task.cancel()

    async def _infer(
        self, request: pb.ModelInferRequest, timeout: float | None
    ) -> tuple[bytes, None] | tuple[pb.ModelInferResponse, QuantgateError]:
        """One request -> (the serialized response, None), or (a response carrying only the
        id, the error). Every request is counted once, however it ends."""
        start = time.perf_counter()
        response = pb.ModelInferResponse(id=request.id)
        model: Model | None = None
        try:
            model = self._engine.model(request.model_name, request.model_version)
            feeds = codec.decode_inputs(request)
            wanted = tuple(o.name for o in request.outputs)
            outputs, timing, rows = await self._engine.infer(model, feeds, wanted, timeout=timeout)
            response.model_name = model.name
            response.model_version = model.version
            encoded = codec.encode_response(response, outputs)
        except QuantgateError as e:
            self._engine.finished(model, status_of(e).name, time.perf_counter() - start)
            return response, e
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the client gives up and at its deadline
            elapsed = time.perf_counter() - start
            code = grpc.StatusCode.CANCELLED
            if timeout is not None and elapsed >= timeout - DEADLINE_SLACK_S:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            self._engine.finished(model, code.name, elapsed)
            raise
        except Exception as e:  # a bug, not the client's fault: answer it, keep serving
            log.exception("request %r to model %r failed", request.id, request.model_name)
            self._engine.finished(model, "INTERNAL", time.perf_counter() - start)
            return response, InferenceFailed(f"internal error: {type(e).__name__}: {e}")
        self._engine.finished(model, "OK", time.perf_counter() - start, timing, rows)
        return encoded, None

    def _config(self, m: Model) -> mc.ModelConfig:
        cfg = self._engine.cfg
        drop = 1 if m.batched else 0  # Triton's dims leave out the batch dimension

        def dims(shape):
            return list(shape[drop:])

        config = mc.ModelConfig(
            name=m.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=m.max_batch_size,
            input=[
                mc.ModelInput(name=t.name, data_type=codec.config_type(t.dtype), dims=dims(t.shape))
                for t in m.inputs
            ],
            output=[
                mc.ModelOutput(
                    name=t.name, data_type=codec.config_type(t.dtype), dims=dims(t.shape)
                )
                for t in m.outputs
            ],
            instance_group=[
                mc.ModelInstanceGroup(
                    name=f"{m.name}_0",
                    kind=mc.ModelInstanceGroup.KIND_GPU
                    if m.provider == CUDA
                    else mc.ModelInstanceGroup.KIND_CPU,
                    count=cfg.instances,
                )
            ],
            default_model_filename=m.variant.file,
            parameters={
                "precision": mc.ModelParameter(string_value=m.variant.precision),
                "execution_provider": mc.ModelParameter(string_value=m.provider),
                "variant_file": mc.ModelParameter(string_value=m.variant.file),
                "variant_sha256": mc.ModelParameter(string_value=m.variant.sha256),
                "sequence_padding": mc.ModelParameter(
                    string_value=str(m.sequence_axis is not None).lower()
                ),
            },
        )
        if cfg.dynamic_batching and m.batched:
            config.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
            config.dynamic_batching.default_queue_policy.max_queue_size = cfg.max_queue_size
        return config
