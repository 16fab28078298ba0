"""`defectscope plc`: alarm and per-part reject signals to the line PLC (Modbus TCP or OPC UA)."""
