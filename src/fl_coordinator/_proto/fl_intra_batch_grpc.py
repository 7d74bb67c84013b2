import purerpc
from . import fl_intra_batch_pb2 as fl_intra_batch__pb2


class FlIntraBatchServicer(purerpc.Servicer):
    async def CheckInClients(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "flcoordinator.v1.FlIntraBatch"
        )
        service_obj.add_method(
            "CheckInClients",
            self.CheckInClients,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra_batch__pb2.ClientBatch,
                fl_intra_batch__pb2.ClientsAccepted,
            )
        )
        return service_obj


class FlIntraBatchStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "flcoordinator.v1.FlIntraBatch",
            channel
        )
        self.CheckInClients = self._client.get_method_stub(
            "CheckInClients",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra_batch__pb2.ClientBatch,
                fl_intra_batch__pb2.ClientsAccepted,
            )
        )