import purerpc
from . import fl_status_pb2 as fl_status__pb2


class FlStatusServicer(purerpc.Servicer):
    async def RoundStatus(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "FlStatus"
        )
        service_obj.add_method(
            "RoundStatus",
            self.RoundStatus,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_status__pb2.FlRoundStatus,
                fl_status__pb2.NULL,
            )
        )
        return service_obj


class FlStatusStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "FlStatus",
            channel
        )
        self.RoundStatus = self._client.get_method_stub(
            "RoundStatus",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_status__pb2.FlRoundStatus,
                fl_status__pb2.NULL,
            )
        )