from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "update", "report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    update: Update
    report: WorkerReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., update: _Optional[_Union[Update, _Mapping]] = ..., report: _Optional[_Union[WorkerReport, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "round_result", "finished")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ROUND_RESULT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    round_result: RoundResult
    finished: Finished
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., round_result: _Optional[_Union[RoundResult, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class InterfaceCounters(_message.Message):
    __slots__ = ("interface", "tx_bytes", "rx_bytes")
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    interface: str
    tx_bytes: int
    rx_bytes: int
    def __init__(self, interface: _Optional[str] = ..., tx_bytes: _Optional[int] = ..., rx_bytes: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol", "requested_worker_id", "codecs", "hostname", "interface_start")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_START_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    requested_worker_id: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    hostname: str
    interface_start: InterfaceCounters
    def __init__(self, protocol: _Optional[str] = ..., requested_worker_id: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., hostname: _Optional[str] = ..., interface_start: _Optional[_Union[InterfaceCounters, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data", "alignment_padding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_PADDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    alignment_padding: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., alignment_padding: _Optional[bytes] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("dataset", "model", "batch_size", "num_shards", "shard_index", "partition", "dirichlet_alpha", "seed", "data_dir", "task", "local_steps", "local_lr")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    DIRICHLET_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LR_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    model: str
    batch_size: int
    num_shards: int
    shard_index: int
    partition: str
    dirichlet_alpha: float
    seed: int
    data_dir: str
    task: str
    local_steps: int
    local_lr: float
    def __init__(self, dataset: _Optional[str] = ..., model: _Optional[str] = ..., batch_size: _Optional[int] = ..., num_shards: _Optional[int] = ..., shard_index: _Optional[int] = ..., partition: _Optional[str] = ..., dirichlet_alpha: _Optional[float] = ..., seed: _Optional[int] = ..., data_dir: _Optional[str] = ..., task: _Optional[str] = ..., local_steps: _Optional[int] = ..., local_lr: _Optional[float] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol", "worker_id", "rank", "task", "codec_spec", "round", "total_rounds", "model", "directive", "workers", "downlink_codec_spec", "buffers")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    worker_id: str
    rank: int
    task: TaskSpec
    codec_spec: str
    round: int
    total_rounds: int
    model: Model
    directive: CodecDirective
    workers: int
    downlink_codec_spec: str
    buffers: Model
    def __init__(self, protocol: _Optional[str] = ..., worker_id: _Optional[str] = ..., rank: _Optional[int] = ..., task: _Optional[_Union[TaskSpec, _Mapping]] = ..., codec_spec: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., model: _Optional[_Union[Model, _Mapping]] = ..., directive: _Optional[_Union[CodecDirective, _Mapping]] = ..., workers: _Optional[int] = ..., downlink_codec_spec: _Optional[str] = ..., buffers: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class EncodedTensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "codec_spec", "payload", "predictor_coefficients", "residual", "alignment_padding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_PADDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    codec_spec: str
    payload: bytes
    predictor_coefficients: bytes
    residual: EncodedTensor
    alignment_padding: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., codec_spec: _Optional[str] = ..., payload: _Optional[bytes] = ..., predictor_coefficients: _Optional[bytes] = ..., residual: _Optional[_Union[EncodedTensor, _Mapping]] = ..., alignment_padding: _Optional[bytes] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("round", "tensors", "train_loss", "num_examples", "compute_seconds", "buffers", "encode_seconds", "previous_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[EncodedTensor]
    train_loss: float
    num_examples: int
    compute_seconds: float
    buffers: Model
    encode_seconds: float
    previous_round: WorkerTiming
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[EncodedTensor, _Mapping]]] = ..., train_loss: _Optional[float] = ..., num_examples: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., buffers: _Optional[_Union[Model, _Mapping]] = ..., encode_seconds: _Optional[float] = ..., previous_round: _Optional[_Union[WorkerTiming, _Mapping]] = ...) -> None: ...

class WorkerTiming(_message.Message):
    __slots__ = ("reply_wait_seconds", "downlink_decode_seconds")
    REPLY_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reply_wait_seconds: float
    downlink_decode_seconds: float
    def __init__(self, reply_wait_seconds: _Optional[float] = ..., downlink_decode_seconds: _Optional[float] = ...) -> None: ...

class CodecDirective(_message.Message):
    __slots__ = ("values", "blob")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    blob: bytes
    def __init__(self, values: _Optional[_Mapping[str, float]] = ..., blob: _Optional[bytes] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("round", "model", "directive", "update_aggregated", "workers", "model_delta", "buffers")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_DELTA_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    model: Model
    directive: CodecDirective
    update_aggregated: bool
    workers: int
    model_delta: ModelDelta
    buffers: Model
    def __init__(self, round: _Optional[int] = ..., model: _Optional[_Union[Model, _Mapping]] = ..., directive: _Optional[_Union[CodecDirective, _Mapping]] = ..., update_aggregated: _Optional[bool] = ..., workers: _Optional[int] = ..., model_delta: _Optional[_Union[ModelDelta, _Mapping]] = ..., buffers: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class ModelDelta(_message.Message):
    __slots__ = ("base_round", "tensors")
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    base_round: int
    tensors: _containers.RepeatedCompositeFieldContainer[EncodedTensor]
    def __init__(self, base_round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[EncodedTensor, _Mapping]]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("rounds", "reason")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    reason: str
    def __init__(self, rounds: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("codec_stats", "interface_start", "interface_end")
    class CodecStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CODEC_STATS_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_START_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_END_FIELD_NUMBER: _ClassVar[int]
    codec_stats: _containers.ScalarMap[str, float]
    interface_start: InterfaceCounters
    interface_end: InterfaceCounters
    def __init__(self, codec_stats: _Optional[_Mapping[str, float]] = ..., interface_start: _Optional[_Union[InterfaceCounters, _Mapping]] = ..., interface_end: _Optional[_Union[InterfaceCounters, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "rank", "connected", "hostname", "rounds_aggregated", "uplink_payload_bytes", "uplink_message_bytes", "downlink_message_bytes", "rejected_messages", "interface_start", "interface_end", "downlink_payload_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    UPLINK_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLINK_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_START_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_END_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    rank: int
    connected: bool
    hostname: str
    rounds_aggregated: int
    uplink_payload_bytes: int
    uplink_message_bytes: int
    downlink_message_bytes: int
    rejected_messages: int
    interface_start: InterfaceCounters
    interface_end: InterfaceCounters
    downlink_payload_bytes: int
    def __init__(self, worker_id: _Optional[str] = ..., rank: _Optional[int] = ..., connected: _Optional[bool] = ..., hostname: _Optional[str] = ..., rounds_aggregated: _Optional[int] = ..., uplink_payload_bytes: _Optional[int] = ..., uplink_message_bytes: _Optional[int] = ..., downlink_message_bytes: _Optional[int] = ..., rejected_messages: _Optional[int] = ..., interface_start: _Optional[_Union[InterfaceCounters, _Mapping]] = ..., interface_end: _Optional[_Union[InterfaceCounters, _Mapping]] = ..., downlink_payload_bytes: _Optional[int] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "uplink_payload_bytes", "uplink_message_bytes", "downlink_message_bytes", "workers_aggregated", "stragglers", "train_loss", "test_accuracy", "test_loss", "downlink_payload_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLINK_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLINK_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    STRAGGLERS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    uplink_payload_bytes: int
    uplink_message_bytes: int
    downlink_message_bytes: int
    workers_aggregated: int
    stragglers: int
    train_loss: float
    test_accuracy: float
    test_loss: float
    downlink_payload_bytes: int
    def __init__(self, round: _Optional[int] = ..., uplink_payload_bytes: _Optional[int] = ..., uplink_message_bytes: _Optional[int] = ..., downlink_message_bytes: _Optional[int] = ..., workers_aggregated: _Optional[int] = ..., stragglers: _Optional[int] = ..., train_loss: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., downlink_payload_bytes: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("protocol", "round", "total_rounds", "codec_spec", "params", "finished", "workers", "rounds", "server_interface_start", "server_interface_now", "downlink_codec_spec")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_INTERFACE_START_FIELD_NUMBER: _ClassVar[int]
    SERVER_INTERFACE_NOW_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    round: int
    total_rounds: int
    codec_spec: str
    params: int
    finished: bool
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    server_interface_start: InterfaceCounters
    server_interface_now: InterfaceCounters
    downlink_codec_spec: str
    def __init__(self, protocol: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., codec_spec: _Optional[str] = ..., params: _Optional[int] = ..., finished: _Optional[bool] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., server_interface_start: _Optional[_Union[InterfaceCounters, _Mapping]] = ..., server_interface_now: _Optional[_Union[InterfaceCounters, _Mapping]] = ..., downlink_codec_spec: _Optional[str] = ...) -> None: ...
