"""EngineCoreClient: how the front-end talks to the EngineCore. One interface; the in-process
client calls the EngineCore directly (a ZMQ client to a background process comes later)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from lmserve.config import EngineConfig
from lmserve.engine.messages import EngineCoreOutputs, EngineCoreRequest


class EngineCoreClient(ABC):
    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """Run (or wait for) one engine step and return its outputs."""

    @abstractmethod
    def shutdown(self) -> None: ...

    @staticmethod
    def make_client(config: EngineConfig) -> EngineCoreClient:
        return InprocClient(config)


class InprocClient(EngineCoreClient):
    """The EngineCore lives in this process; get_output() runs one step."""

    def __init__(self, config: EngineConfig) -> None:
        from lmserve.core.engine_core import EngineCore

        self.engine_core = EngineCore(config)
        self._pending_aborts: list = []

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self._pending_aborts.extend(self.engine_core.abort_requests(request_ids))

    def get_output(self) -> EngineCoreOutputs:
        outputs = self.engine_core.step()
        if self._pending_aborts:  # report aborts with the next outputs
            outputs.outputs = self._pending_aborts + outputs.outputs
            self._pending_aborts = []
        return outputs

    def shutdown(self) -> None:
        pass
