import purerpc
from . import fl_round_pb2 as fl_round__pb2


class FlRoundServicer(purerpc.Servicer):
    async def CheckIn(self, input_messages):
        raise NotImplementedError()

    async def Update(self, input_messages):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "FlRound"
        )
        service_obj.add_method(
            "CheckIn",
            self.CheckIn,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                fl_round__pb2.CheckInRequest,
                fl_round__pb2.FlData,
            )
        )
        service_obj.add_method(
            "Update",
            self.Update,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_UNARY,
                fl_round__pb2.FlData,
                fl_round__pb2.FlData,
            )
        )
        return service_obj


class FlRoundStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "FlRound",
            channel
        )
        self.CheckIn = self._client.get_method_stub(
            "CheckIn",
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                fl_round__pb2.CheckInRequest,
                fl_round__pb2.FlData,
            )
        )
        self.Update = self._client.get_method_stub(
            "Update",
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_UNARY,
                fl_round__pb2.FlData,
                fl_round__pb2.FlData,
            )
        )