import purerpc
from . import fl_intra_batch_pb2 as fl_intra_batch__pb2


class FlIntraBatchServicer(purerpc.Servicer):
    async def CheckInClients(self, input_message):
        raise NotImplementedError()

    async def ReleaseClients(self, input_message):
        raise NotImplementedError()

    async def ReportAggregate(self, input_message):
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
        service_obj.add_method(
            "ReleaseClients",
            self.ReleaseClients,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra_batch__pb2.ClientRelease,
                fl_intra_batch__pb2.ClientsReleased,
            )
        )
        service_obj.add_method(
            "ReportAggregate",
            self.ReportAggregate,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra_batch__pb2.AggregateReport,
                fl_intra_batch__pb2.ReportAnswer,
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
        self.ReleaseClients = self._client.get_method_stub(
            "ReleaseClients",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra_batch__pb2.ClientRelease,
                fl_intra_batch__pb2.ClientsReleased,
            )
        )
        self.ReportAggregate = self._client.get_method_stub(
            "ReportAggregate",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra_batch__pb2.AggregateReport,
                fl_intra_batch__pb2.ReportAnswer,
            )
        )