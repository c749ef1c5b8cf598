"""ServeConfig: every knob of the server in one frozen, typed value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("fp32", "int8", "fp16")


@dataclass(frozen=True)
class TLSConfig:
    cert: Path  # PEM server certificate chain
    key: Path  # PEM private key
    client_ca: Path | None = None  # set: mutual TLS, clients must present a cert it signed


@dataclass(frozen=True)
class ServeConfig:
    path: Path  # one bundle, or a repository folder of bundles (see runtime.load_repository)
    host: str = "0.0.0.0"
    port: int = 8001  # Triton's gRPC port; 0 picks a free one (tests)
    device: str = "auto"  # auto: CUDA when onnxruntime has the CUDA provider, else CPU
    # Largest batch one request may carry, and the largest batch the batcher forms.
    max_batch_size: int = 32
    dynamic_batching: bool = True
    # How long the batcher may hold the oldest request waiting for company. 0: never wait,
    # take what is already queued; under load requests pile up while the previous batch
    # runs, so batches still form, and a lone request pays no delay.
    max_queue_delay_us: int = 0
    # Requests admitted but not yet running; beyond it a request gets UNAVAILABLE at once,
    # so overload costs bounded memory and the client learns to back off.
    max_queue_size: int = 256
    # Batches executing concurrently per model. 1 on CPU: ORT already uses every core
    # (intra-op threads) for one batch, and a second one only contends for them.
    instances: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (the physical cores)
    allow_failed_gates: bool = False  # serve a bundle whose verdict is fail (its FP32 variant)
    precision: str | None = None  # force a variant instead of the fastest that passed
    warmup: bool = True  # run each model once per batching bucket before reporting ready
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: off
    tls: TLSConfig | None = None
    auth_token: str | None = None  # required as "authorization: Bearer <token>" when set
    max_message_bytes: int = 64 << 20  # larger requests fail with RESOURCE_EXHAUSTED
    shutdown_grace_s: float = 30.0  # SIGTERM: time admitted requests get to finish

    def __post_init__(self):
        from quantgate.errors import ConfigError

        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("max_batch_size", "max_queue_size", "instances"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0 or self.port < 0 or self.intra_op_threads < 0:
            raise ConfigError("max_queue_delay_us, port and intra_op_threads cannot be negative")
