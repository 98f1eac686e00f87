"""The data plane: per attached session, the pumps that read, cut frames (through the
codec) and forward, and the memory budget for partial frames."""
