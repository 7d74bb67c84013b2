import purerpc
from . import fl_intra_pb2 as fl_intra__pb2


class FlIntraServicer(purerpc.Servicer):
    async def ClientCountUpdate(self, input_message):
        raise NotImplementedError()

    async def SelectorAggregationComplete(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "FlIntra"
        )
        service_obj.add_method(
            "ClientCountUpdate",
            self.ClientCountUpdate,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra__pb2.ClientCount,
                fl_intra__pb2.FlClientStatus,
            )
        )
        service_obj.add_method(
            "SelectorAggregationComplete",
            self.SelectorAggregationComplete,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra__pb2.SelectorId,
                fl_intra__pb2.Empty,
            )
        )
        return service_obj


class FlIntraStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "FlIntra",
            channel
        )
        self.ClientCountUpdate = self._client.get_method_stub(
            "ClientCountUpdate",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra__pb2.ClientCount,
                fl_intra__pb2.FlClientStatus,
            )
        )
        self.SelectorAggregationComplete = self._client.get_method_stub(
            "SelectorAggregationComplete",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra__pb2.SelectorId,
                fl_intra__pb2.Empty,
            )
        )


class FLGoalCountBroadcastServicer(purerpc.Servicer):
    async def GoalCountReached(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "FLGoalCountBroadcast"
        )
        service_obj.add_method(
            "GoalCountReached",
            self.GoalCountReached,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra__pb2.Empty,
                fl_intra__pb2.Empty,
            )
        )
        return service_obj


class FLGoalCountBroadcastStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "FLGoalCountBroadcast",
            channel
        )
        self.GoalCountReached = self._client.get_method_stub(
            "GoalCountReached",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                fl_intra__pb2.Empty,
                fl_intra__pb2.Empty,
            )
        )