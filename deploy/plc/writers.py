"""Writes to the PLC: Modbus TCP (pymodbus) coils / holding registers, or OPC UA (asyncua) node values.

A writer reconnects on the next write after a failure; the bridge re-writes its level signals
every second, so a PLC that was away gets the current state as soon as it is back.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from deploy.plc.config import Address, Modbus, OpcUa

log = logging.getLogger("defectscope.plc")


class WriteFailed(RuntimeError):
    """The PLC refused a write or could not be reached."""


class Writer(Protocol):
    async def write_bool(self, address: Address, value: bool) -> None: ...
    async def write_int(self, address: Address, value: int) -> None: ...
    async def close(self) -> None: ...


class ModbusWriter:
    def __init__(self, cfg: Modbus) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        self.cfg = cfg
        self.client = AsyncModbusTcpClient(cfg.host, port=cfg.port, timeout=2, retries=0)

    async def _ready(self) -> None:
        if not self.client.connected and not await self.client.connect():
            raise WriteFailed(f"Modbus {self.cfg.host}:{self.cfg.port}: cannot connect")

    async def write_bool(self, address: Address, value: bool) -> None:
        await self._call("write_coil", int(address), bool(value))

    async def write_int(self, address: Address, value: int) -> None:
        await self._call("write_register", int(address), int(value) & 0xFFFF)

    async def _call(self, method: str, address: int, value: Any) -> None:
        from pymodbus.exceptions import ModbusException

        try:
            await self._ready()
            rr = await getattr(self.client, method)(address, value, device_id=self.cfg.device_id)
        except (ModbusException, OSError) as exc:
            self.client.close()
            raise WriteFailed(f"Modbus {method} {address}: {exc}") from None
        if rr.isError():
            raise WriteFailed(f"Modbus {method} {address}: the PLC answered {rr}")

    async def close(self) -> None:
        self.client.close()


class OpcUaWriter:
    def __init__(self, cfg: OpcUa) -> None:
        self.cfg = cfg
        self.client: Any = None
        self.types: dict[str, Any] = {}  # node id -> its variant type (read once)

    async def _ready(self) -> Any:
        if self.client is None:
            from asyncua import Client

            client = Client(self.cfg.endpoint, timeout=4)
            await client.connect()
            self.client = client
        return self.client

    async def _write(self, node_id: str, value: Any) -> None:
        from asyncua import ua

        try:
            client = await self._ready()
            node = client.get_node(node_id)
            if node_id not in self.types:
                self.types[node_id] = await node.read_data_type_as_variant_type()
            await node.write_value(ua.DataValue(ua.Variant(value, self.types[node_id])))
        except Exception as exc:  # noqa: BLE001 - asyncua raises many kinds (ua.UaError, TimeoutError, OSError)
            await self.close()
            raise WriteFailed(f"OPC UA {node_id}: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def write_bool(self, address: Address, value: bool) -> None:
        await self._write(str(address), bool(value))

    async def write_int(self, address: Address, value: int) -> None:
        await self._write(str(address), int(value))

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001 - already gone
                pass
