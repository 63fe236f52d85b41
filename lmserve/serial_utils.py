"""The wire codec: msgpack through msgspec, with numpy arrays and CPU tensors as zero-copy frames.

Used on every socket between processes (front-end <-> EngineCore, EngineCore <-> workers);
nothing on those sockets is pickled."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

_EXT_NDARRAY = 1


class MsgpackEncoder:
    """`encode(obj) -> frames`: frames[0] is the msgpack body; every numpy array or CPU tensor
    inside becomes its own frame (its buffer, not a copy) referenced by index."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._frames: list[Any] | None = None

    def encode(self, obj: Any) -> list[Any]:
        self._frames = [b""]
        try:
            self._frames[0] = self._encoder.encode(obj)
            return self._frames
        finally:
            self._frames = None

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self._array_ext(obj)
        if type(obj).__module__ == "torch" and hasattr(obj, "numpy"):  # a torch.Tensor
            return self._array_ext(obj.detach().cpu().numpy())
        raise NotImplementedError(f"cannot encode {type(obj).__name__}")

    def _array_ext(self, array: np.ndarray) -> msgspec.msgpack.Ext:
        array = np.ascontiguousarray(array)
        index = len(self._frames)
        self._frames.append(array.data if array.nbytes else b"")
        header = msgspec.msgpack.encode((array.dtype.str, array.shape, index))
        return msgspec.msgpack.Ext(_EXT_NDARRAY, header)


class MsgpackDecoder:
    """Inverse of MsgpackEncoder; arrays come back as read-only numpy views of their frames."""

    def __init__(self, type_: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(type_, ext_hook=self._ext_hook)
        self._frames: list[Any] | None = None

    def decode(self, frames: list[Any]) -> Any:
        self._frames = [memoryview(f.buffer if hasattr(f, "buffer") else f) for f in frames]
        try:
            return self._decoder.decode(self._frames[0])
        finally:
            self._frames = None

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code != _EXT_NDARRAY:
            raise NotImplementedError(f"unknown msgpack extension {code}")
        dtype, shape, index = msgspec.msgpack.decode(data)
        return np.frombuffer(self._frames[index], dtype=dtype).reshape(shape)
